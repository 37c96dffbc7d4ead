//! Watching the loop from outside: the InferenceService (desired and ready replicas, the last
//! decision), its pods, and every pod's engine and sidecar metrics, sampled on a fixed period.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use redline_operator::crd::InferenceService;

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
    /// `redline_sidecar_guard_actions_total{direction="down"}`: the fast guard cutting limits.
    pub guard_down: u64,
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
    let ready = st
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Some(PodView {
        target: Target {
            namespace: namespace.to_string(),
            pod: p.metadata.name.clone()?,
            ip,
        },
        ready,
        deleting: p.metadata.deletion_timestamp.is_some(),
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

/// The sum of the sidecar's downward guard actions in its metrics text.
pub fn guard_down_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("redline_sidecar_guard_actions_total{")
                && l.contains("direction=\"down\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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
        let guard = transport
            .get(&p.target, 8090, "/metrics")
            .await
            .map(|m| guard_down_total(&m))
            .unwrap_or(0);
        Some((
            p.target.pod.clone(),
            PodSample {
                t,
                kv: r.kv_usage_ratio,
                running: r.requests_running,
                waiting: r.requests_waiting,
                max_num_seqs: r.limits.map(|l| l.max_num_seqs),
                preemptions: r.preemptions_total,
                guard_down: guard,
            },
        ))
    });
    join_all(reads).await.into_iter().flatten().collect()
}

/// The service's desired replicas and last decision.
pub async fn service(
    client: &Client,
    namespace: &str,
    name: &str,
) -> kube::Result<(i32, Option<String>)> {
    let i = Api::<InferenceService>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let decision = i.status.and_then(|s| s.last_decision).map(|d| d.summary);
    Ok((i.spec.replicas.unwrap_or(i.spec.min_replicas), decision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_downward_guard_actions() {
        let m = "# TYPE redline_sidecar_guard_actions_total counter
redline_sidecar_guard_actions_total{direction=\"down\",reason=\"forecast\"} 3
redline_sidecar_guard_actions_total{direction=\"down\",reason=\"preemption\"} 2
redline_sidecar_guard_actions_total{direction=\"up\",reason=\"calm\"} 7
redline_sidecar_guard_down_other 9
";
        assert_eq!(guard_down_total(m), 5);
        assert_eq!(guard_down_total(""), 0);
    }
}
