//! How the autoscaling loop sees a service's engine pods: which serve, which start, which wait
//! for a node (and the scheduler's words for it), which sidecar is read at which IP, and which
//! pod was left draining by no drain of this operator's.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use kube::ResourceExt;
use redline_api::PressureReport;
use redline_autoscale::PodPhase;

use crate::children;
use crate::conditions::{Cond, RESOURCES_AVAILABLE};

/// The label every pod of the operator's Deployments carries.
pub const ENGINE_PODS: &str = "app.kubernetes.io/managed-by=redline-operator";

/// One pod as a pass sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodEntry {
    pub name: String,
    pub phase: PodPhase,
    /// Where its sidecar is read; `None` for a pod not read (no IP yet, or not running).
    pub ip: Option<String>,
}

impl PodEntry {
    /// `None` for a pod being deleted. A ready pod's sidecar is read for the policy, and a
    /// starting one's whose containers run, for a drain it may hold (`orphaned_drain`).
    pub fn new(pod: &Pod, draining: &[String]) -> Option<Self> {
        let name = pod.name_any();
        let phase = pod_phase(pod, draining.contains(&name))?;
        let st = pod.status.as_ref();
        let running = st.and_then(|s| s.phase.as_deref()) == Some("Running");
        let read = phase == PodPhase::Ready || (phase == PodPhase::Starting && running);
        let ip = st.and_then(|s| s.pod_ip.clone()).filter(|_| read);
        Some(Self { name, phase, ip })
    }
}

/// Engine pods by service key (`namespace/name`).
pub fn by_service<'a>(pods: impl Iterator<Item = &'a Pod>) -> HashMap<String, Vec<Pod>> {
    let mut by: HashMap<String, Vec<Pod>> = HashMap::new();
    for p in pods {
        let svc = p
            .labels()
            .get(children::SERVICE_LABEL)
            .cloned()
            .unwrap_or_default();
        by.entry(format!("{}/{svc}", p.namespace().unwrap_or_default()))
            .or_default()
            .push(Pod::clone(p));
    }
    by
}

/// How the policy sees a pod; `None` for one being deleted (it is the ReplicaSet's, not ours).
pub fn pod_phase(pod: &Pod, draining: bool) -> Option<PodPhase> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if ready_condition(pod) || draining {
        // A draining pod turns not ready on purpose: it still holds requests.
        return Some(PodPhase::Ready);
    }
    Some(if scheduling_failure(pod).is_some() {
        PodPhase::Unschedulable
    } else {
        PodPhase::Starting
    })
}

/// Whether a pod's Ready condition is True.
fn ready_condition(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Whether a pod takes requests: Ready, and not being deleted.
pub fn serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && ready_condition(pod)
}

/// Whether a pod's sidecar holds a drain that no policy in this process started or took over
/// from status: an earlier leader's whose memory never reached status, or one under way when
/// autoscaling was turned off. Its engine turned not ready on purpose and would stay so for
/// good, serving nothing while the policy counted it as starting, which holds every
/// scale-down. The operator serves it again, and a new drain comes only from a full window of
/// fresh data, as after any restart.
pub fn orphaned_drain(report: Option<&PressureReport>, draining_here: bool) -> bool {
    !draining_here && report.is_some_and(|r| r.limits.drain)
}

/// Which pods' reports reach the policy and the status: the ready ones', as before, and a pod
/// left draining reads as ready (it serves what it holds, as a drain of the policy's own does),
/// so the policy, not draining it, tells its sidecar to stop. Every other not-ready pod's
/// report is dropped. Returns the pods left draining.
pub fn admit_reports(
    entries: &mut [PodEntry],
    reports: &mut [Option<PressureReport>],
    draining: &[String],
) -> Vec<String> {
    let mut orphans = Vec::new();
    for (e, r) in entries.iter_mut().zip(reports.iter_mut()) {
        if orphaned_drain(r.as_ref(), draining.contains(&e.name)) {
            e.phase = PodPhase::Ready;
            orphans.push(e.name.clone());
        } else if e.phase != PodPhase::Ready {
            *r = None;
        }
    }
    orphans
}

/// The scheduler's `PodScheduled` False/`Unschedulable` condition, while it has one.
fn scheduling_failure(pod: &Pod) -> Option<&PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_deref()?
        .iter()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
}

/// Whether every pod of the service found a node: `ResourcesAvailable` False with the
/// scheduler's own words (e.g. "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.") while
/// any waits for one.
pub fn resources_condition(pods: &[Pod]) -> Cond<'static> {
    // A pod being deleted is the ReplicaSet's business, not a capacity problem.
    let waiting: Vec<(String, &str)> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let c = scheduling_failure(p)?;
            Some((p.name_any(), c.message.as_deref().unwrap_or_default()))
        })
        .collect();
    match waiting.as_slice() {
        [] => Cond {
            type_: RESOURCES_AVAILABLE,
            ok: Some(true),
            reason: "Scheduled",
            message: "every pod has a node".into(),
        },
        [(pod, why), ..] => Cond {
            type_: RESOURCES_AVAILABLE,
            ok: Some(false),
            reason: "Unschedulable",
            message: format!(
                "{} pod(s) cannot be scheduled ({pod}: {why}); the autoscaler adds none while one \
                 waits",
                waiting.len()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::report;
    use redline_api::Level;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn pods_map_to_phases_and_a_draining_pod_counts_as_serving() {
        let ready =
            pod("metadata: {name: a}\nstatus: {conditions: [{type: Ready, status: 'True'}]}");
        let loading = pod("metadata: {name: b}\nstatus: {conditions: [{type: Ready, status: 'False'}, {type: PodScheduled, status: 'True'}]}");
        let pending = pod("metadata: {name: c}\nstatus: {conditions: [{type: PodScheduled, status: 'False', reason: Unschedulable}]}");
        let gone = pod("metadata: {name: d, deletionTimestamp: '2026-01-01T00:00:00Z'}\nstatus: {conditions: [{type: Ready, status: 'True'}]}");
        assert_eq!(pod_phase(&ready, false), Some(PodPhase::Ready));
        assert_eq!(pod_phase(&loading, false), Some(PodPhase::Starting));
        assert_eq!(pod_phase(&loading, true), Some(PodPhase::Ready));
        assert_eq!(pod_phase(&pending, false), Some(PodPhase::Unschedulable));
        assert_eq!(pod_phase(&gone, false), None);
        assert!(serving(&ready) && !serving(&loading) && !serving(&gone));
    }

    #[test]
    fn a_ready_pod_is_read_and_a_starting_one_only_once_its_containers_run() {
        let ip = |yaml: &str, draining: &[String]| PodEntry::new(&pod(yaml), draining).unwrap().ip;
        let ready = "metadata: {name: a}\nstatus: {podIP: 10.0.0.1, phase: Running, conditions: [{type: Ready, status: 'True'}]}";
        assert_eq!(ip(ready, &[]).as_deref(), Some("10.0.0.1"));
        let loading = "metadata: {name: b}\nstatus: {podIP: 10.0.0.2, phase: Running, conditions: [{type: Ready, status: 'False'}]}";
        assert_eq!(ip(loading, &[]).as_deref(), Some("10.0.0.2"));
        let pulling = "metadata: {name: c}\nstatus: {podIP: 10.0.0.3, phase: Pending}";
        assert_eq!(ip(pulling, &[]), None);
        let draining = PodEntry::new(&pod(loading), &["b".to_string()]).unwrap();
        assert_eq!(draining.phase, PodPhase::Ready, "a drain of ours serves");
        let gone = "metadata: {name: d, deletionTimestamp: '2026-01-01T00:00:00Z'}";
        assert_eq!(PodEntry::new(&pod(gone), &[]), None);
    }

    #[test]
    fn a_pod_without_a_node_makes_resources_unavailable_in_the_schedulers_words() {
        let ready =
            pod("metadata: {name: a}\nstatus: {conditions: [{type: Ready, status: 'True'}]}");
        let loading = pod(
            "metadata: {name: b}\nstatus: {conditions: [{type: PodScheduled, status: 'True'}]}",
        );
        let c = resources_condition(&[ready.clone(), loading]);
        assert_eq!((c.ok, c.reason), (Some(true), "Scheduled"));
        let pending = pod("metadata: {name: c}\nstatus: {conditions: [{type: PodScheduled, status: 'False', reason: Unschedulable, message: '0/2 nodes are available: 2 Insufficient nvidia.com/gpu.'}]}");
        let c = resources_condition(&[ready.clone(), pending.clone(), pending]);
        assert_eq!((c.ok, c.reason), (Some(false), "Unschedulable"));
        assert!(c.message.starts_with("2 pod(s) cannot be scheduled (c: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu.)"), "{}", c.message);
        // A pod being deleted is the ReplicaSet's business, not a capacity problem.
        let leaving = pod("metadata: {name: d, deletionTimestamp: '2026-01-01T00:00:00Z'}\nstatus: {conditions: [{type: PodScheduled, status: 'False', reason: Unschedulable}]}");
        assert_eq!(resources_condition(&[ready, leaving]).ok, Some(true));
        assert_eq!(resources_condition(&[]).ok, Some(true));
    }

    #[test]
    fn a_pod_left_draining_reads_as_serving_and_other_unready_pods_report_nothing() {
        let draining = |on: bool| {
            let mut r = report(0.1, Level::Ok);
            r.limits.drain = on;
            Some(r)
        };
        let entry = |n: &str, phase| PodEntry {
            name: n.to_string(),
            phase,
            ip: Some("10.88.0.9".to_string()),
        };
        let mut entries = vec![
            entry("ready", PodPhase::Ready),
            entry("loading", PodPhase::Starting),
            entry("left-draining", PodPhase::Starting),
            entry("ours", PodPhase::Ready),
            entry("ready-left-draining", PodPhase::Ready),
        ];
        let mut reports = vec![
            draining(false),
            draining(false),
            draining(true),
            draining(true),
            draining(true),
        ];
        let orphans = admit_reports(&mut entries, &mut reports, &["ours".to_string()]);
        assert_eq!(orphans, ["left-draining", "ready-left-draining"]);
        let phases: Vec<PodPhase> = entries.iter().map(|e| e.phase).collect();
        use PodPhase::*;
        assert_eq!(phases, [Ready, Starting, Ready, Ready, Ready]);
        let reported: Vec<bool> = reports.iter().map(Option::is_some).collect();
        assert_eq!(reported, [true, false, true, true, true]);
        // Left draining: by no drain of this policy's, whatever the pod's readiness.
        assert!(orphaned_drain(reports[2].as_ref(), false));
        assert!(orphaned_drain(reports[4].as_ref(), false));
        assert!(
            !orphaned_drain(reports[3].as_ref(), true),
            "the policy's own"
        );
        assert!(!orphaned_drain(reports[0].as_ref(), false));
        assert!(!orphaned_drain(None, false));
    }

    #[test]
    fn pods_group_by_their_services_namespace_and_label() {
        let p = |ns: &str, svc: &str| {
            pod(&format!(
                "metadata: {{name: x, namespace: {ns}, labels: {{{}: {svc}}}}}",
                children::SERVICE_LABEL
            ))
        };
        let pods = [p("a", "s"), p("b", "s"), p("a", "s"), p("a", "t")];
        let by = by_service(pods.iter());
        let mut sizes: Vec<(&str, usize)> = by.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        sizes.sort();
        assert_eq!(sizes, [("a/s", 2), ("a/t", 1), ("b/s", 1)]);
    }
}
