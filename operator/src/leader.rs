//! Leader election on a coordination.k8s.io Lease, so two operator replicas never reconcile at
//! once. Optimistic concurrency (resourceVersion) decides races; a leader that cannot renew
//! within the lease duration stops reconciling and campaigns again. A leader that is stopped
//! (SIGTERM: a rolling update, a drained node) releases the lease, so the standby takes over
//! at its next try (every 2 s) instead of after the lease expires.
//!
//! A standby is ready (its `/readyz` answers 200): readiness says the process works, not that
//! it leads. Were it "leads", a rolling update of one replica could never finish (the new pod
//! waits for the lease the old one keeps until the new one is ready) and a second replica
//! would never count as available.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;
use tracing::{info, warn};

use crate::log_once::LastError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Free or expired (or already ours): take or renew it.
    Take,
    /// Held by someone else whose lease is still valid.
    Wait,
}

/// Pure: whether `me` may hold the lease at `now`.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(s) = spec else { return Decision::Take };
    let holder = s.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return Decision::Take;
    }
    let duration = SignedDuration::from_secs(s.lease_duration_seconds.unwrap_or(15) as i64);
    match s.renew_time.as_ref() {
        Some(MicroTime(t)) if *t + duration > now => Decision::Wait,
        _ => Decision::Take,
    }
}

/// What this instance is in the election, as `/readyz` and the `leader` gauge report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No answer from the API server about the lease yet, or none within a lease duration
    /// since leading.
    Starting,
    /// Another instance leads; this one is ready to take over.
    Standby,
    Leader,
}

/// The current [`Role`], shared between the election and the HTTP handlers.
#[derive(Debug, Default)]
pub struct RoleCell(AtomicU8);

impl RoleCell {
    pub fn get(&self) -> Role {
        match self.0.load(Ordering::SeqCst) {
            0 => Role::Starting,
            1 => Role::Standby,
            _ => Role::Leader,
        }
    }
    pub fn set(&self, r: Role) {
        self.0.store(r as u8, Ordering::SeqCst);
    }
}

/// Pure: the lease once its holder has let it go. Like client-go's release: no holder, a
/// duration of one second; the transition count stays (the next holder adds one).
pub fn released(spec: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..spec.clone()
    }
}

pub struct LeaseLock {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub role: std::sync::Arc<RoleCell>,
}

impl LeaseLock {
    /// One attempt; Ok(true) when we hold the lease afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        if decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        ) == Decision::Wait
        {
            return Ok(false);
        }
        let transitions = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .map(|s| {
                let ours = s.holder_identity.as_deref() == Some(&self.identity);
                s.lease_transitions.unwrap_or(0) + i32::from(!ours)
            })
            .unwrap_or(0);
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(MicroTime(now)),
            acquire_time: current
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .filter(|s| s.holder_identity.as_deref() == Some(&self.identity))
                .and_then(|s| s.acquire_time.clone())
                .or(Some(MicroTime(now))),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let r = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            Some(mut lease) => {
                // replace carries resourceVersion: a concurrent writer makes this a 409.
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match r {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Lets the lease go if this instance holds it. One attempt, bounded (a call to a server
    /// that never answers, or a client that retries, could outlast the pod's grace period):
    /// on failure the lease expires on its own
    /// within its duration.
    pub async fn release(&self) {
        let r = tokio::time::timeout(self.duration / 3, async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(false);
            };
            let Some(spec) = lease.spec.as_ref() else {
                return Ok(false);
            };
            if spec.holder_identity.as_deref() != Some(&self.identity) {
                return Ok(false);
            }
            lease.spec = Some(released(spec, Timestamp::now()));
            // resourceVersion is carried: a lease someone took meanwhile is not overwritten.
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        })
        .await;
        self.role.set(Role::Standby);
        match r {
            Ok(Ok(true)) => info!(lease = %self.name, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(lease = %self.name, "could not release the lease (it expires on its own): {e}")
            }
            Err(_) => warn!(
                lease = %self.name,
                "no answer releasing the lease (it expires on its own)"
            ),
        }
    }

    /// How often a standby tries for the lease (client-go's retry period): a leader that stops
    /// releases it, and until the standby's next try nobody decides (the takeover gap, a few
    /// seconds, within which the successor of a stopped leader decides as it would have).
    fn retry_period(&self) -> Duration {
        (self.duration / 7).min(Duration::from_secs(2))
    }

    /// Blocks until this instance is the leader.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        // Tried every two seconds: an API server that is away is logged when that begins,
        // changes or ends, not at each try.
        let mut error = LastError::default();
        loop {
            let tried = self.try_acquire().await;
            if tried.is_ok() && error.worked() {
                info!(lease = %self.name, "leader election: the API server answers again");
            }
            match tried {
                Ok(true) => {
                    self.role.set(Role::Leader);
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {
                    self.role.set(Role::Standby);
                    if !waiting_logged {
                        info!(lease = %self.name, "another instance leads; standing by");
                        waiting_logged = true;
                    }
                }
                Err(e) => {
                    if error.failed(&e.to_string()) {
                        warn!(lease = %self.name, "leader election: {e}");
                    }
                }
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// How long a leader keeps leading without a renewal: two thirds of the lease (client-go's
    /// 10 s of 15), so it has stopped before a standby may take the expired lease.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Renews until leadership is lost (returns then). API errors are retried until the renew
    /// deadline. Each attempt is bounded by what is left of it, whatever the client does (kube's
    /// default retries a 503 for minutes; the operator's own gives up within seconds, but a
    /// server that accepts and never answers holds a call for the read timeout): a renewal
    /// still in flight when the lease expires would let a standby lead beside this instance.
    pub async fn hold(&self) {
        let deadline = self.renew_deadline();
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            let left = deadline.saturating_sub(last_ok.elapsed());
            let error = match tokio::time::timeout(left, self.try_acquire()).await {
                Ok(Ok(true)) => {
                    last_ok = tokio::time::Instant::now();
                    continue;
                }
                Ok(Ok(false)) => {
                    self.role.set(Role::Standby);
                    warn!(lease = %self.name, "leadership lost to another instance");
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer from the API server".to_string(),
            };
            if last_ok.elapsed() >= deadline {
                self.role.set(Role::Starting);
                warn!(lease = %self.name, "could not renew the lease within {deadline:?}: {error}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(100).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Take);
        assert_eq!(decide(Some(&spec("a", 99, 15)), "a", now), Decision::Take);
        assert_eq!(decide(Some(&spec("b", 90, 15)), "a", now), Decision::Wait);
        assert_eq!(
            decide(Some(&spec("b", 80, 15)), "a", now),
            Decision::Take,
            "expired"
        );
        assert_eq!(
            decide(Some(&spec("", 99, 15)), "a", now),
            Decision::Take,
            "released"
        );
    }

    #[test]
    fn a_released_lease_is_anyones_at_once() {
        let now = Timestamp::from_second(100).unwrap();
        let held = LeaseSpec {
            lease_transitions: Some(4),
            ..spec("a", 99, 15)
        };
        assert_eq!(decide(Some(&held), "b", now), Decision::Wait);
        let r = released(&held, now);
        assert_eq!(decide(Some(&r), "b", now), Decision::Take);
        assert_eq!(
            r.lease_transitions,
            Some(4),
            "the next holder counts the transition"
        );
        assert_eq!(r.holder_identity, None);
    }

    /// An API server that answers 503 to everything (one starting, or overloaded): kube's
    /// client retries such answers for minutes, but the leader must stop within its renew
    /// deadline, before the lease it cannot renew expires.
    #[tokio::test]
    async fn a_leader_whose_renewals_hang_stops_within_the_renew_deadline() {
        let client = crate::test_support::unavailable_api_server().await;
        let role = std::sync::Arc::new(RoleCell::default());
        role.set(Role::Leader);
        let lock = LeaseLock {
            api: Api::namespaced(client, "redline"),
            name: "redline-operator".into(),
            identity: "a".into(),
            duration: Duration::from_secs(3),
            role: role.clone(),
        };
        let t0 = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), lock.hold())
            .await
            .expect("still leading 10 s into a 3 s lease it could not renew");
        assert!(
            t0.elapsed() < lock.duration,
            "stopped at {:?}",
            t0.elapsed()
        );
        assert_eq!(role.get(), Role::Starting);
    }

    #[test]
    fn the_role_cell_round_trips() {
        let c = RoleCell::default();
        assert_eq!(c.get(), Role::Starting);
        for r in [Role::Standby, Role::Leader, Role::Starting] {
            c.set(r);
            assert_eq!(c.get(), r);
        }
    }
}
