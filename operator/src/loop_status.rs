//! What the autoscaling loop writes into a service's status after each pass (`kvUsage`,
//! `lateRequests`, `podLimits`, `lastDecision`, its three conditions and the policy's memory),
//! worked out from the pass with no I/O. The reconciler owns the rest of status; the loop
//! writes its part by a merge patch under its own field manager, and only when it differs
//! from the object (level-based: a write lost to a race with the reconciler is made again on
//! the next pass).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use redline_api::{Level, PressureReport};
use redline_autoscale::{Action, Decision as PolicyDecision};
use serde_json::json;

use crate::conditions::{self, Cond, AUTOSCALER_OWNED, NEAR_REDLINE};
use crate::crd::{
    late_requests_text, AutoscalerMemory, Decision, InferenceServiceStatus, PodLimits,
};
use crate::engine_pods::PodEntry;
use crate::memory;

/// KV usage at which a pod counts as near its redline without the sidecar saying so.
const NEAR_REDLINE_KV: f64 = 0.95;

/// The pressure a pass read, summed over the pods that reported.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pressure {
    /// Mean and highest KV usage, and whether any pod is near its redline; `None` without any
    /// report.
    pub summary: Option<(f64, f64, bool)>,
    /// Requests per second served after the TTFT objective; `None` without an objective, or
    /// when no engine counts them.
    pub late: Option<f64>,
}

impl Pressure {
    pub fn of(reports: &[Option<PressureReport>], ttft_objective: bool) -> Self {
        let got: Vec<&PressureReport> = reports.iter().flatten().collect();
        Self {
            summary: pressure_summary(&got),
            late: if ttft_objective {
                late_rate(&got)
            } else {
                None
            },
        }
    }
}

/// The KV usage shown by `kubectl get` and whether the service is near its redline; `None`
/// without any report.
pub fn pressure_summary(reports: &[&PressureReport]) -> Option<(f64, f64, bool)> {
    let engines: Vec<_> = reports
        .iter()
        .filter_map(|r| r.engine.as_ref().map(|e| (r, e)))
        .collect();
    if engines.is_empty() {
        return None;
    }
    let mean = engines.iter().map(|(_, e)| e.kv_usage_ratio).sum::<f64>() / engines.len() as f64;
    let max = engines
        .iter()
        .map(|(_, e)| e.kv_usage_ratio)
        .fold(0.0, f64::max);
    let near = engines.iter().any(|(r, e)| {
        r.derived.level == Level::Critical
            || r.derived.preemptions_per_second > 0.0
            || e.kv_usage_ratio >= NEAR_REDLINE_KV
    });
    Some((mean, max, near))
}

/// Requests per second served after the TTFT objective, summed over the pods whose engines
/// count them; `None` when none does.
pub fn late_rate(reports: &[&PressureReport]) -> Option<f64> {
    reports
        .iter()
        .filter_map(|r| r.derived.late_requests_per_second)
        .reduce(|a, b| a + b)
}

/// `NearRedline` from the pass's pressure.
fn near_redline(summary: Option<(f64, f64, bool)>) -> Cond<'static> {
    match summary {
        None => Cond {
            type_: NEAR_REDLINE,
            ok: None,
            reason: "NoPressureData",
            message: "no pod's sidecar has reported yet".into(),
        },
        Some((_, max, true)) => Cond {
            type_: NEAR_REDLINE,
            ok: Some(true),
            reason: "KvPressure",
            message: format!(
                "a pod is at or forecast to reach its KV redline, or preempting (highest KV \
                 usage {:.0}%)",
                max * 100.0
            ),
        },
        Some((_, max, false)) => Cond {
            type_: NEAR_REDLINE,
            ok: Some(false),
            reason: "BelowRedline",
            message: format!("highest KV usage {:.0}%", max * 100.0),
        },
    }
}

/// What one pass saw and decided, as the status reports it.
pub struct Pass<'a> {
    pub entries: &'a [PodEntry],
    pub reports: &'a [Option<PressureReport>],
    pub pressure: Pressure,
    /// `None` while autoscaling is off.
    pub decision: Option<&'a PolicyDecision>,
    /// The policy's memory as of this pass (`None` while autoscaling is off).
    pub memory: Option<AutoscalerMemory>,
    /// `ResourcesAvailable` and `ScalingActive`.
    pub conditions: [Cond<'static>; 2],
}

/// The loop's part of status.
#[derive(Debug)]
pub struct LoopStatus {
    pub kv_usage: Option<String>,
    pub late_requests: Option<String>,
    pub pod_limits: Vec<PodLimits>,
    pub last_decision: Option<Decision>,
    /// The whole list, the reconciler's conditions as they are (the list is one value to a
    /// 1.20 API server).
    pub conditions: Vec<Condition>,
    pub autoscaler_memory: Option<AutoscalerMemory>,
}

impl LoopStatus {
    /// Whether `status` already holds all of it (then there is nothing to write).
    pub fn written_in(&self, status: &InferenceServiceStatus) -> bool {
        self.kv_usage == status.kv_usage
            && self.late_requests == status.late_requests
            && self.pod_limits == status.pod_limits
            && self.last_decision == status.last_decision
            && self.conditions == status.conditions
            && self.autoscaler_memory == status.autoscaler_memory
    }

    /// What the pass makes of `current`, at `now`, for the object's `generation`.
    pub fn after(
        current: &InferenceServiceStatus,
        generation: Option<i64>,
        pass: Pass,
        now: Timestamp,
    ) -> Self {
        let [resources, scaling] = pass.conditions;
        let ours = conditions::merge(
            &current.conditions,
            now,
            generation,
            vec![near_redline(pass.pressure.summary), resources, scaling],
        );
        let conditions = current
            .conditions
            .iter()
            .filter(|c| !AUTOSCALER_OWNED.contains(&c.type_.as_str()))
            .cloned()
            .chain(ours)
            .collect();
        let draining = pass.decision.map(|d| d.draining.as_slice()).unwrap_or(&[]);
        let pod_limits = pass
            .entries
            .iter()
            .zip(pass.reports)
            .filter_map(|(e, r)| {
                let r = r.as_ref()?;
                let l = r
                    .limits
                    .guard_limits
                    .or(r.engine.as_ref().and_then(|e| e.limits))?;
                Some(PodLimits {
                    pod: e.name.clone(),
                    max_num_seqs: l.max_num_seqs as i32,
                    max_batched_tokens: l.max_batched_tokens as i32,
                    draining: draining.contains(&e.name),
                })
            })
            .collect();
        let last_decision = match pass.decision.filter(|d| d.action != Action::Hold) {
            Some(d) => Some(Decision {
                summary: d.summary(),
                reason: d.reason.clone(),
                time: now.to_string(),
            }),
            None => current.last_decision.clone(),
        };
        // Written as it changes, but what moves every pass (the error budget's newest span,
        // the last pass that saw a pod starting) once a minute at most (`memory::due`).
        let autoscaler_memory = match pass.memory {
            Some(m) if !memory::due(current.autoscaler_memory.as_ref(), &m) => {
                current.autoscaler_memory.clone()
            }
            m => m,
        };
        Self {
            kv_usage: pass
                .pressure
                .summary
                .map(|(mean, _, _)| format!("{:.0}%", mean * 100.0)),
            late_requests: pass.pressure.late.map(late_requests_text),
            pod_limits,
            last_decision,
            conditions,
            autoscaler_memory,
        }
    }

    /// The merge patch that writes it.
    pub fn patch(&self) -> serde_json::Value {
        json!({"status": {
            "kvUsage": self.kv_usage,
            "lateRequests": self.late_requests,
            "podLimits": self.pod_limits,
            "lastDecision": self.last_decision,
            "conditions": self.conditions,
            "autoscalerMemory": self.autoscaler_memory,
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{RESOURCES_AVAILABLE, SCALING_ACTIVE};
    use crate::test_support::report;
    use redline_api::Limits;
    use redline_autoscale::PodPhase;

    #[test]
    fn the_summary_is_the_mean_usage_and_near_means_critical_preempting_or_full() {
        assert_eq!(pressure_summary(&[]), None);
        let (a, b) = (report(0.2, Level::Ok), report(0.6, Level::Elevated));
        let (mean, max, near) = pressure_summary(&[&a, &b]).unwrap();
        assert!((mean - 0.4).abs() < 1e-9 && max == 0.6 && !near);
        let c = report(0.5, Level::Critical);
        assert!(pressure_summary(&[&a, &c]).unwrap().2);
        let full = report(0.97, Level::Ok);
        assert!(pressure_summary(&[&full]).unwrap().2);
    }

    #[test]
    fn the_late_rate_sums_the_pods_that_count_late_requests() {
        let report = |late: Option<f64>| {
            let mut r = report(0.1, Level::Ok);
            r.derived.late_requests_per_second = late;
            r
        };
        let (a, b, none) = (report(Some(0.5)), report(Some(0.25)), report(None));
        assert_eq!(late_rate(&[]), None);
        assert_eq!(late_rate(&[&none]), None, "no engine counts them");
        assert_eq!(late_rate(&[&a, &none, &b]), Some(0.75));
        let both = [Some(a), Some(b)];
        assert_eq!(Pressure::of(&both, true).late, Some(0.75));
        assert_eq!(Pressure::of(&both, false).late, None, "no objective");
    }

    fn cond(type_: &'static str, ok: bool, reason: &'static str) -> Cond<'static> {
        Cond {
            type_,
            ok: Some(ok),
            reason,
            message: reason.into(),
        }
    }

    fn entry(name: &str) -> PodEntry {
        PodEntry {
            name: name.into(),
            phase: PodPhase::Ready,
            ip: Some("10.0.0.1".into()),
        }
    }

    /// A pass over pods `a` (guard limits 4/256) and `b` (no report), autoscaling off.
    fn pass<'a>(entries: &'a [PodEntry], reports: &'a [Option<PressureReport>]) -> Pass<'a> {
        Pass {
            entries,
            reports,
            pressure: Pressure::of(reports, false),
            decision: None,
            memory: None,
            conditions: [
                cond(RESOURCES_AVAILABLE, true, "Scheduled"),
                cond(SCALING_ACTIVE, false, "AutoscalingDisabled"),
            ],
        }
    }

    #[test]
    fn a_pass_that_changes_nothing_leaves_status_as_it_is_and_keeps_the_reconcilers_conditions() {
        let entries = [entry("a"), entry("b")];
        let mut r = report(0.3, Level::Ok);
        r.limits.guard_limits = Some(Limits::new(4, 256));
        let reports = [Some(r), None];
        let t0: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        let mut status = InferenceServiceStatus {
            conditions: conditions::merge(&[], t0, Some(1), vec![cond("Ready", true, "Ready")]),
            ..Default::default()
        };
        let first = LoopStatus::after(&status, Some(1), pass(&entries, &reports), t0);
        assert!(!first.written_in(&status), "the first pass writes");
        assert_eq!(first.kv_usage.as_deref(), Some("30%"));
        assert_eq!(first.late_requests, None);
        assert_eq!(first.pod_limits.len(), 1, "only the pod that reported");
        assert_eq!(
            (
                first.pod_limits[0].max_num_seqs,
                first.pod_limits[0].draining
            ),
            (4, false)
        );
        let types: Vec<&str> = first.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            ["Ready", NEAR_REDLINE, RESOURCES_AVAILABLE, SCALING_ACTIVE]
        );
        // Written back, a later pass that sees the same makes no write: its conditions keep
        // their transition times.
        let patch = first.patch();
        status.kv_usage = first.kv_usage.clone();
        status.pod_limits = first.pod_limits.clone();
        status.conditions = first.conditions.clone();
        assert_eq!(patch["status"]["kvUsage"], "30%");
        let t1: Timestamp = "2026-11-29T10:05:00Z".parse().unwrap();
        let again = LoopStatus::after(&status, Some(1), pass(&entries, &reports), t1);
        assert!(again.written_in(&status), "{again:?}");
        // A pod's KV usage moving past a percent is news.
        let mut fuller = reports.clone();
        fuller[0]
            .as_mut()
            .unwrap()
            .engine
            .as_mut()
            .unwrap()
            .kv_usage_ratio = 0.97;
        let near = LoopStatus::after(&status, Some(1), pass(&entries, &fuller), t1);
        let c = conditions::find(&near.conditions, NEAR_REDLINE).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "KvPressure")
        );
        assert_eq!(near.kv_usage.as_deref(), Some("97%"));
    }
}
