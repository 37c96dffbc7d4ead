//! From per-pod pressure to one number: how many replicas the current load needs, each run at
//! the policy's targets.
//!
//! Two resources can run out, so a pod's need is the larger of the two:
//! - compute: the tokens arriving per second over what one replica sustains within the SLO
//!   (measured by a bench, as NVIDIA Dynamo's planner profiles its engines), plus the backlog
//!   drained within a few seconds, over the target utilization;
//! - KV memory: the pool's usage over the target usage.
//!
//! Tokens are counted on arrival, so demand keeps rising when an engine saturates (the admitted
//! rate would flatten at capacity and hide the rest). Utilization of the engine loop itself is
//! no load signal: one decoding sequence keeps a batch engine busy all the time.

use redline_api::{ArrivalPeak, Level, PressureReport};
use serde::{Deserialize, Serialize};

/// What one replica sustains while meeting its latency objectives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplicaCapacity {
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
}

/// What the policy reads from one pod's pressure report.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSignals {
    /// Seconds since the sidecar last read the engine.
    pub sample_age_seconds: f64,
    pub kv_usage: f64,
    pub running: u64,
    pub waiting: u64,
    /// Tokens the waiting requests will compute; `None` when the engine does not say.
    pub waiting_tokens: Option<u64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub generation_tokens_per_second: Option<f64>,
    pub preemptions_per_second: f64,
    pub level: Level,
    /// The pod's recent arrival curve (empty when its sidecar does not measure one).
    pub arrival_peaks: Vec<ArrivalPeak>,
    /// Requests served after the TTFT objective, and all first tokens, per second; `None`
    /// when the engine does not count them.
    pub late_per_second: Option<f64>,
    pub first_tokens_per_second: Option<f64>,
}

impl PodSignals {
    /// `None` before the sidecar has read the engine once, or while it cannot reach it (its
    /// last reading would pass for fresh data about a pod that is gone).
    pub fn from_report(r: &PressureReport) -> Option<Self> {
        let e = r.engine.as_ref()?;
        if !r.engine_reachable {
            return None;
        }
        Some(Self {
            sample_age_seconds: r.sample_age_seconds.unwrap_or(f64::INFINITY),
            kv_usage: e.kv_usage_ratio,
            running: e.requests_running,
            waiting: e.requests_waiting,
            waiting_tokens: e.waiting_prompt_tokens,
            prompt_tokens_per_second: r.derived.prompt_tokens_per_second,
            generation_tokens_per_second: r.derived.generation_tokens_per_second,
            preemptions_per_second: r.derived.preemptions_per_second,
            level: r.derived.level,
            arrival_peaks: r.derived.prompt_arrival_peaks.clone(),
            late_per_second: r.derived.late_requests_per_second,
            first_tokens_per_second: r.derived.first_tokens_per_second,
        })
    }
}

/// The target utilization to plan with when the engines admit deadline-first (given the TTFT
/// objective) and when they admit in arrival order. With the objective the policy sizes by the
/// SLO's error budget ([`crate::budget`]): it plans at full measured capacity while nothing
/// burns, and guards with a margin when requests go late, so the headroom is no longer a
/// fixed share. In arrival order it is: 0.6, measured with `redline-sim` as the highest that
/// keeps >= 99% of requests within a 2 s TTFT on the code trace at x1 and x4, cold start 60 s
/// and 120 s, and with its prompts scaled 1.5x and 2x (docs/autoscaling.md).
pub const TARGET_UTILIZATION_DEADLINE: f64 = 1.0;
pub const TARGET_UTILIZATION_ARRIVAL_ORDER: f64 = 0.6;

/// The default target utilization for engines that do (`true`) or do not know their TTFT
/// objective.
pub fn default_target_utilization(engines_know_ttft_objective: bool) -> f64 {
    if engines_know_ttft_objective {
        TARGET_UTILIZATION_DEADLINE
    } else {
        TARGET_UTILIZATION_ARRIVAL_ORDER
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemandConfig {
    pub capacity: ReplicaCapacity,
    /// Share of a replica's capacity the policy plans to use (the rest absorbs bursts while new
    /// replicas start).
    pub target_utilization: f64,
    pub target_kv_usage: f64,
    /// The backlog counts as the rate that clears it within this many seconds.
    pub backlog_drain_seconds: f64,
}

/// Replicas needed, and what drives it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Demand {
    /// Replicas needed at the targets: the sum over pods of the larger of compute and KV.
    pub replicas: f64,
    /// Token arrivals plus backlog, in replicas at full capacity.
    pub compute: f64,
    /// Mean KV usage over the pods counted.
    pub kv_usage: f64,
    /// The KV term alone: the sum over pods of usage over the target, in replicas.
    pub kv_replicas: f64,
    pub pods: usize,
}

/// One pod's compute load in replicas at full capacity; `None` without token rates.
fn compute_load(p: &PodSignals, c: &DemandConfig) -> Option<f64> {
    let cap = c.capacity;
    let prompt = p.prompt_tokens_per_second? / cap.prompt_tokens_per_second.max(1e-9);
    let gen =
        p.generation_tokens_per_second.unwrap_or(0.0) / cap.generation_tokens_per_second.max(1e-9);
    let backlog = match p.waiting_tokens {
        Some(t) => t as f64 / (cap.prompt_tokens_per_second * c.backlog_drain_seconds).max(1e-9),
        // Without the backlog's size, a queue as long as the batch counts as the batch again.
        None => (prompt + gen) * p.waiting as f64 / p.running.max(1) as f64,
    };
    Some(prompt + gen + backlog)
}

pub fn demand<'a>(pods: impl IntoIterator<Item = &'a PodSignals>, c: &DemandConfig) -> Demand {
    let mut d = Demand::default();
    let mut kv_sum = 0.0;
    for p in pods {
        let kv = p.kv_usage.clamp(0.0, 1.0);
        let compute = compute_load(p, c).unwrap_or(0.0);
        let by_compute = compute / c.target_utilization.max(1e-3);
        let by_kv = kv / c.target_kv_usage.max(1e-3);
        d.replicas += by_compute.max(by_kv);
        d.kv_replicas += by_kv;
        d.compute += compute;
        kv_sum += kv;
        d.pods += 1;
    }
    if d.pods > 0 {
        d.kv_usage = kv_sum / d.pods as f64;
    }
    d
}

/// Replicas, at full capacity, that would have prefilled the pods' recent bursts each within
/// `budget` seconds of queueing: for every window of the arrival curve, the prompt tokens that
/// arrived within it (summed over the pods) must be done within the window plus the budget.
/// Short windows measure a burst, long ones a rate. `None` when no pod has an arrival curve.
pub fn burst_replicas<'a>(
    pods: impl IntoIterator<Item = &'a PodSignals>,
    capacity: &ReplicaCapacity,
    budget: f64,
) -> Option<f64> {
    let mut sums: Vec<(f64, u64)> = Vec::new();
    for p in pods {
        for a in &p.arrival_peaks {
            match sums.iter_mut().find(|(w, _)| *w == a.window_seconds) {
                Some(s) => s.1 += a.tokens,
                None => sums.push((a.window_seconds, a.tokens)),
            }
        }
    }
    let rate = capacity.prompt_tokens_per_second.max(1e-9);
    sums.iter()
        .map(|&(w, tokens)| tokens as f64 / (rate * (w + budget).max(1e-3)))
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DemandConfig {
        DemandConfig {
            capacity: ReplicaCapacity {
                prompt_tokens_per_second: 1000.0,
                generation_tokens_per_second: 100.0,
            },
            target_utilization: 0.5,
            target_kv_usage: 0.8,
            backlog_drain_seconds: 10.0,
        }
    }

    fn pod(prompt: f64, gen: f64, kv: f64) -> PodSignals {
        PodSignals {
            sample_age_seconds: 0.1,
            kv_usage: kv,
            running: 1,
            waiting: 0,
            waiting_tokens: Some(0),
            prompt_tokens_per_second: Some(prompt),
            generation_tokens_per_second: Some(gen),
            preemptions_per_second: 0.0,
            level: Level::Ok,
            arrival_peaks: Vec::new(),
            late_per_second: None,
            first_tokens_per_second: None,
        }
    }

    #[test]
    fn compute_and_kv_each_set_a_floor() {
        // 400 prompt + 10 gen tokens/s = 0.5 of a replica at full capacity = 1 at 50%.
        let d = demand(&[pod(400.0, 10.0, 0.1)], &cfg());
        assert!((d.replicas - 1.0).abs() < 1e-9 && (d.compute - 0.5).abs() < 1e-9);
        // KV at 0.8 is one replica at its target even with no compute load.
        let d = demand(&[pod(0.0, 0.0, 0.8)], &cfg());
        assert!((d.replicas - 1.0).abs() < 1e-9);
        let d = demand(&[pod(400.0, 10.0, 0.1), pod(0.0, 0.0, 0.8)], &cfg());
        assert!((d.replicas - 2.0).abs() < 1e-9 && (d.kv_usage - 0.45).abs() < 1e-9);
    }

    #[test]
    fn the_backlog_adds_the_rate_that_drains_it() {
        let mut p = pod(500.0, 0.0, 0.2);
        p.waiting = 20;
        p.waiting_tokens = Some(5000);
        // 0.5 arriving + 5000 / (1000 * 10) = 1.0 at full capacity, 2 replicas at 50%.
        assert!((demand(&[p.clone()], &cfg()).replicas - 2.0).abs() < 1e-9);
        p.waiting_tokens = None;
        p.running = 10;
        // 20 waiting behind 10 running: the queue counts twice the batch's load.
        assert!((demand(&[p], &cfg()).compute - 1.5).abs() < 1e-9);
    }
}
