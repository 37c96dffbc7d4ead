//! Kubernetes-style status conditions: a condition's lastTransitionTime moves only when its
//! status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// True when the service's pods are close to running out of KV cache or device memory.
pub const NEAR_REDLINE: &str = "NearRedline";
/// False (reason `Unschedulable`) while a pod of the service waits for a node with room for it;
/// the autoscaler adds no replica meanwhile. The name and reason are Knative's (a Revision's
/// ResourcesAvailable), which KServe users meet in the same situation.
pub const RESOURCES_AVAILABLE: &str = "ResourcesAvailable";
/// The reason a spec that cannot be served gets (`Degraded` True, `Ready` False, and
/// `ScalingActive` False while autoscaling is on).
pub const INVALID_SPEC: &str = "InvalidSpec";
/// Whether redline's autoscaling sets the replicas: False when it is off, while the spec is
/// invalid, or while another autoscaler (an HPA) targets the service (`scaling_active`). The
/// name is the HPA's own.
pub const SCALING_ACTIVE: &str = "ScalingActive";
/// The conditions the autoscaling loop writes (from pods and sidecars); the reconciler keeps
/// them as they are.
pub const AUTOSCALER_OWNED: [&str; 3] = [NEAR_REDLINE, RESOURCES_AVAILABLE, SCALING_ACTIVE];

pub struct Cond<'a> {
    pub type_: &'a str,
    pub ok: Option<bool>,
    pub reason: &'a str,
    pub message: String,
}

/// The new conditions list, keeping transition times of unchanged ones from `previous`.
pub fn merge(
    previous: &[Condition],
    now: Timestamp,
    generation: Option<i64>,
    new: Vec<Cond>,
) -> Vec<Condition> {
    new.into_iter()
        .map(|c| {
            let status = status(c.ok);
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason.into(),
                // A 1.20 server rejects an empty message (it arrives as null).
                message: if c.message.is_empty() {
                    c.reason.to_string()
                } else {
                    c.message
                },
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect()
}

pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Whether `conds` holds a condition of `type_` with this status ("True", "False").
pub fn has(conds: &[Condition], type_: &str, status: &str) -> bool {
    find(conds, type_).is_some_and(|c| c.status == status)
}

/// Whether `c` starts an episode: `previous` has no condition of its type with the same status
/// and reason (so an Event said once per episode is said now).
pub fn enters(previous: &[Condition], c: &Cond) -> bool {
    let status = status(c.ok);
    !find(previous, c.type_).is_some_and(|p| p.status == status && p.reason == c.reason)
}

fn status(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t = |s| Timestamp::from_second(s).unwrap();
        let c = |ok| {
            vec![Cond {
                type_: READY,
                ok: Some(ok),
                reason: "R",
                message: String::new(),
            }]
        };
        let a = merge(&[], t(1), Some(1), c(false));
        let b = merge(&a, t(2), Some(1), c(false));
        assert_eq!(b[0].last_transition_time, Time(t(1)));
        let d = merge(&b, t(3), Some(2), c(true));
        assert_eq!(d[0].last_transition_time, Time(t(3)));
        assert_eq!(d[0].observed_generation, Some(2));
    }

    #[test]
    fn an_episode_starts_when_status_or_reason_changes() {
        let c = |ok, reason| Cond {
            type_: READY,
            ok: Some(ok),
            reason,
            message: String::new(),
        };
        let before = merge(&[], Timestamp::UNIX_EPOCH, None, vec![c(false, "A")]);
        assert!(enters(&[], &c(false, "A")));
        assert!(!enters(&before, &c(false, "A")));
        assert!(enters(&before, &c(false, "B")));
        assert!(enters(&before, &c(true, "A")));
    }
}
