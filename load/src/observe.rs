//! Watching the loop from outside: the InferenceService (desired and ready replicas, the last
//! decision), its pods, and every pod's engine and sidecar metrics, sampled on a fixed period.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use redline_api::prom::{Exposition, ParseError};
use redline_autoscale::PodPhase;
use redline_operator::crd::{late_requests_per_second, InferenceService};
use redline_operator::engine_pods::pod_phase;

use crate::transport::{Target, Transport};

/// The service, once per observer tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds since the replay started.
    pub t: f64,
    /// `spec.replicas`: what the autoscaler asks for.
    pub desired: i32,
    /// Ready pods (the ones requests go to).
    pub ready: usize,
    /// Pods that exist and are not being deleted (starting, ready or draining): what is paid for.
    pub pods: usize,
    /// Requests arriving per second since the previous sample, and those in flight now.
    pub arrival_rate: f64,
    pub in_flight: u64,
    /// Highest and mean KV-cache usage over the pods' engines.
    pub kv_max: f64,
    pub kv_mean: f64,
    /// `status.lastDecision.summary`.
    pub decision: Option<String>,
    /// `status.lateRequests`: requests per second served after the TTFT objective, as the
    /// engines count them and the operator sums them.
    pub late_per_second: Option<f64>,
}

/// One pod's engine and sidecar, once per observer tick.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSample {
    pub t: f64,
    pub kv: f64,
    pub running: u64,
    pub waiting: u64,
    /// The engine's live admission limit (what the guard and the operator move).
    pub max_num_seqs: Option<u32>,
    pub preemptions: u64,
    /// The fast guard's cuts so far, and their timing.
    pub guard_down: u64,
    pub guard_timed: u64,
    pub guard_within_1s: u64,
}

/// The pods requests may go to (ready, not being deleted), shared with the replay.
pub type ReadyPods = Arc<RwLock<Vec<Target>>>;

/// What the observer has seen of the service and its pods.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub target: Target,
    pub ready: bool,
    pub deleting: bool,
}

fn view(namespace: &str, p: &Pod) -> Option<PodView> {
    let st = p.status.as_ref()?;
    let ip = st.pod_ip.clone()?;
    if matches!(st.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    // The operator's own reading of a pod: `None` while it is being deleted.
    let phase = pod_phase(p, false);
    Some(PodView {
        target: Target {
            namespace: namespace.to_string(),
            pod: p.metadata.name.clone()?,
            ip,
        },
        ready: phase == Some(PodPhase::Ready),
        deleting: phase.is_none(),
    })
}

/// The service's pods with an IP, by name.
pub async fn pods(client: &Client, namespace: &str, service: &str) -> kube::Result<Vec<PodView>> {
    let list = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("redline.dev/inference-service={service}")))
        .await?;
    let mut v: Vec<PodView> = list
        .items
        .iter()
        .filter_map(|p| view(namespace, p))
        .collect();
    v.sort_by(|a, b| a.target.pod.cmp(&b.target.pod));
    Ok(v)
}

/// What the sidecar's metrics say of its guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardCounts {
    /// Cuts (`redline_sidecar_guard_actions_total{direction="down"}`).
    pub down: u64,
    /// Cuts timed from the scrape that showed the pressure to the engine's ack, and of those
    /// the ones within a second (`redline_sidecar_guard_reaction_seconds`).
    pub timed: u64,
    pub within_1s: u64,
}

pub fn guard_counts(metrics: &str) -> Result<GuardCounts, ParseError> {
    let m = Exposition::parse(metrics)?;
    let actions = m.sum_where(
        "redline_sidecar_guard_actions_total",
        &[("direction", "down")],
    );
    let reaction = m
        .histogram("redline_sidecar_guard_reaction_seconds")
        .unwrap_or_default();
    Ok(GuardCounts {
        down: actions.unwrap_or(0.0) as u64,
        timed: reaction.count,
        within_1s: reaction.at_most(1.0).unwrap_or(0),
    })
}

/// Reads every pod's engine and sidecar metrics; pods that do not answer (starting, gone) are
/// left out of this tick.
pub async fn scrape(
    transport: &Transport,
    pods: &[PodView],
    t: f64,
) -> BTreeMap<String, PodSample> {
    let reads = pods.iter().map(|p| async move {
        let engine = transport.get(&p.target, 8000, "/metrics").await.ok()?;
        let r = redline_sidecar::scrape::parse(&engine).ok()?;
        let guard = match transport.get(&p.target, 8090, "/metrics").await {
            Ok(m) => guard_counts(&m).unwrap_or_else(|e| {
                // A page we cannot read would count as a guard that never acts: say so once.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| eprintln!("sidecar metrics of {}: {e}", p.target.pod));
                GuardCounts::default()
            }),
            // Starting or gone: this tick goes without it.
            Err(_) => GuardCounts::default(),
        };
        Some((
            p.target.pod.clone(),
            PodSample {
                t,
                kv: r.kv_usage_ratio,
                running: r.requests_running,
                waiting: r.requests_waiting,
                max_num_seqs: r.limits.map(|l| l.max_num_seqs),
                preemptions: r.preemptions_total,
                guard_down: guard.down,
                guard_timed: guard.timed,
                guard_within_1s: guard.within_1s,
            },
        ))
    });
    join_all(reads).await.into_iter().flatten().collect()
}

/// What the service's spec and status say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceView {
    pub desired: i32,
    pub decision: Option<String>,
    pub late_per_second: Option<f64>,
}

pub async fn service(client: &Client, namespace: &str, name: &str) -> kube::Result<ServiceView> {
    let i = Api::<InferenceService>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let status = i.status.unwrap_or_default();
    Ok(ServiceView {
        desired: i.spec.replicas.unwrap_or(i.spec.min_replicas),
        decision: status.last_decision.map(|d| d.summary),
        late_per_second: status
            .late_requests
            .as_deref()
            .and_then(late_requests_per_second),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guards_cuts_and_their_timing() {
        // The page as the sidecar renders it: cuts for two reasons, and raises; reactions
        // timed at 0.1, 0.2, 0.3, 0.8 and 2 s.
        let sidecar = redline_sidecar::metrics::Metrics::default();
        let actions = &sidecar.guard_actions;
        actions.with_label_values(&["down", "forecast"]).inc_by(3);
        actions.with_label_values(&["down", "preemption"]).inc_by(2);
        actions.with_label_values(&["up", "calm"]).inc_by(7);
        for s in [0.1, 0.2, 0.3, 0.8, 2.0] {
            sidecar.guard_reaction.observe(s);
        }
        let m = &sidecar.render();
        assert_eq!(
            guard_counts(m),
            Ok(GuardCounts {
                down: 5,
                timed: 5,
                within_1s: 4
            })
        );
        assert!(guard_counts("").is_err() && guard_counts("not { metrics").is_err());
    }
}
