//! A pod's status as the API shows it (phase, conditions, containerStatuses, IPs), computed from
//! what the agent knows about its processes. Pure: the pod worker writes the result.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        started_at: Timestamp,
        finished_at: Timestamp,
    },
}

#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    pub name: String,
    pub image: String,
    pub phase: Phase,
    pub last_terminated: Option<Phase>,
    pub ready: bool,
    pub restart_count: i32,
    pub pid: Option<u32>,
    /// Whether it will be started again (restartPolicy allows and the pod is not stopping).
    pub will_restart: bool,
}

impl ContainerRuntime {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            phase: Phase::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_terminated: None,
            ready: false,
            restart_count: 0,
            pid: None,
            will_restart: true,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PodRuntime {
    pub containers: Vec<ContainerRuntime>,
    pub pod_ip: Option<String>,
    pub host_ip: Option<String>,
    pub start_time: Option<Timestamp>,
    /// Setup failed for good (e.g. GPUs taken): the pod is Failed with this reason and message.
    pub failed: Option<(String, String)>,
}

fn state(p: &Phase) -> ContainerState {
    match p {
        Phase::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        Phase::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..Default::default()
        },
        Phase::Terminated {
            exit_code,
            signal,
            reason,
            started_at,
            finished_at,
        } => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: *exit_code,
                signal: *signal,
                reason: Some(reason.clone()),
                started_at: Some(Time(*started_at)),
                finished_at: Some(Time(*finished_at)),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// The pod phase by Kubernetes' rules.
pub fn phase(rt: &PodRuntime) -> &'static str {
    if rt.failed.is_some() {
        return "Failed";
    }
    let done =
        |c: &ContainerRuntime| matches!(c.phase, Phase::Terminated { .. }) && !c.will_restart;
    if !rt.containers.is_empty() && rt.containers.iter().all(done) {
        let ok = rt
            .containers
            .iter()
            .all(|c| matches!(c.phase, Phase::Terminated { exit_code: 0, .. }));
        return if ok { "Succeeded" } else { "Failed" };
    }
    let started = |c: &ContainerRuntime| {
        matches!(c.phase, Phase::Running { .. } | Phase::Terminated { .. }) || c.restart_count > 0
    };
    if rt.containers.iter().any(started) {
        "Running"
    } else {
        "Pending"
    }
}

/// The status to write. `previous` conditions keep their transition times while unchanged.
pub fn pod_status(rt: &PodRuntime, previous: &[PodCondition], now: Timestamp) -> PodStatus {
    let all_ready = !rt.containers.is_empty() && rt.containers.iter().all(|c| c.ready);
    let not_ready: Vec<&str> = rt
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let cond = |type_: &str, ok: bool, reason: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|p| p.type_ == type_ && p.status == status)
            .and_then(|p| p.last_transition_time.clone())
            .unwrap_or(Time(now));
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: Some(since),
            reason: reason.map(String::from),
            message: (!ok && reason.is_some())
                .then(|| format!("containers with unready status: [{}]", not_ready.join(" "))),
            ..Default::default()
        }
    };
    let unready = (!all_ready).then_some("ContainersNotReady");
    let conditions = vec![
        cond("Initialized", true, None),
        cond("Ready", all_ready, unready),
        cond("ContainersReady", all_ready, unready),
        cond("PodScheduled", true, None),
    ];
    let statuses = rt
        .containers
        .iter()
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone(),
            image_id: format!("redline-local://{}", c.image),
            container_id: c.pid.map(|p| format!("redline-local://{p}")),
            ready: c.ready,
            restart_count: c.restart_count,
            started: Some(matches!(c.phase, Phase::Running { .. })),
            state: Some(state(&c.phase)),
            last_state: c.last_terminated.as_ref().map(state),
            ..Default::default()
        })
        .collect();
    let (reason, message) = match &rt.failed {
        Some((r, m)) => (Some(r.clone()), Some(m.clone())),
        None => (None, None),
    };
    PodStatus {
        phase: Some(phase(rt).into()),
        conditions: Some(conditions),
        container_statuses: Some(statuses),
        pod_ip: rt.pod_ip.clone(),
        pod_ips: rt.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        host_ip: rt.host_ip.clone(),
        start_time: rt.start_time.map(Time),
        reason,
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(phases: &[(Phase, bool, bool)]) -> PodRuntime {
        PodRuntime {
            containers: phases
                .iter()
                .enumerate()
                .map(|(i, (p, ready, again))| ContainerRuntime {
                    phase: p.clone(),
                    ready: *ready,
                    will_restart: *again,
                    ..ContainerRuntime::new(&format!("c{i}"), "img")
                })
                .collect(),
            ..Default::default()
        }
    }

    fn term(code: i32) -> Phase {
        let t = Timestamp::UNIX_EPOCH;
        Phase::Terminated {
            exit_code: code,
            signal: None,
            reason: "Completed".into(),
            started_at: t,
            finished_at: t,
        }
    }

    #[test]
    fn phases() {
        let waiting = Phase::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        };
        let running = Phase::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        assert_eq!(phase(&rt(&[(waiting.clone(), false, true)])), "Pending");
        assert_eq!(
            phase(&rt(&[
                (running.clone(), true, true),
                (waiting, false, true)
            ])),
            "Running"
        );
        assert_eq!(phase(&rt(&[(term(1), false, true)])), "Running");
        assert_eq!(
            phase(&rt(&[(term(0), false, false), (term(0), false, false)])),
            "Succeeded"
        );
        assert_eq!(
            phase(&rt(&[(term(0), false, false), (term(2), false, false)])),
            "Failed"
        );
    }

    #[test]
    fn ready_needs_every_container_and_keeps_transition_times() {
        let running = Phase::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        let t0 = Timestamp::from_second(100).unwrap();
        let t1 = Timestamp::from_second(200).unwrap();
        let one = rt(&[
            (running.clone(), true, true),
            (running.clone(), false, true),
        ]);
        let s = pod_status(&one, &[], t0);
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .unwrap()
        };
        assert_eq!(ready(&s).status, "False");
        let both = rt(&[(running.clone(), true, true), (running, true, true)]);
        let s2 = pod_status(&both, s.conditions.as_ref().unwrap(), t1);
        assert_eq!(ready(&s2).status, "True");
        assert_eq!(ready(&s2).last_transition_time, Some(Time(t1)));
        let s3 = pod_status(
            &both,
            s2.conditions.as_ref().unwrap(),
            Timestamp::from_second(300).unwrap(),
        );
        assert_eq!(
            ready(&s3).last_transition_time,
            Some(Time(t1)),
            "unchanged status keeps its time"
        );
    }
}
