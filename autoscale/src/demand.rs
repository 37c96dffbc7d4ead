//! From per-pod pressure to one number: how many replicas the current load needs, each run at
//! the policy's targets.
//!
//! Two resources can run out, so a pod's need is the larger of the two:
//! - compute: the tokens arriving per second over what one replica sustains within the SLO
//!   (measured by a bench, as NVIDIA Dynamo's planner profiles its engines), plus the backlog
//!   drained within a few seconds, over the target utilization;
//! - KV memory: the replicas that would hold the pod's pool at the target usage, the pools
//!   taken as queues (`kv_need`).
//!
//! Tokens are counted on arrival, so demand keeps rising when an engine saturates (the admitted
//! rate would flatten at capacity and hide the rest). Utilization of the engine loop itself is
//! no load signal: one decoding sequence keeps a batch engine busy all the time. Less each
//! step's fixed cost it is (`load_share`), and the KV term reads it.

use redline_api::{ArrivalPeak, Level, PressureReport};
use serde::{Deserialize, Serialize};

/// What one replica sustains while meeting its latency objectives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplicaCapacity {
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    /// The step of one sequence decoding alone: the fixed cost every step pays whatever its
    /// batch (an 8B model's weights read once). `None` when the bench did not measure it; the
    /// KV term then takes the pools to shrink in proportion to the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_seconds: Option<f64>,
}

/// What the policy reads from one pod's pressure report.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSignals {
    /// Seconds since the sidecar last read the engine.
    pub sample_age_seconds: f64,
    pub kv_usage: f64,
    pub running: u64,
    pub waiting: u64,
    /// A drain's lame duck: the engine is out of the Service but still admits what the
    /// Service sent before it knew, so it is not empty for good even with nothing running.
    pub lame_duck: bool,
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
    /// The share of the load window the engine spent stepping, and its steps per second;
    /// `None` when it does not export its step histogram.
    pub busy_share: Option<f64>,
    pub steps_per_second: Option<f64>,
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
            lame_duck: e.lame_duck == Some(true),
            waiting_tokens: e.waiting_prompt_tokens,
            prompt_tokens_per_second: r.derived.prompt_tokens_per_second,
            generation_tokens_per_second: r.derived.generation_tokens_per_second,
            preemptions_per_second: r.derived.preemptions_per_second,
            level: r.derived.level,
            arrival_peaks: r.derived.prompt_arrival_peaks.clone(),
            late_per_second: r.derived.late_requests_per_second,
            first_tokens_per_second: r.derived.first_tokens_per_second,
            busy_share: r.derived.busy_share,
            steps_per_second: r.derived.steps_per_second,
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

/// The KV usage to steer the pods towards when the policy knows a replica's fixed step cost
/// (`true`: the KV term follows the pools as queues, `kv_need`) and when it does not (it
/// then takes the pools to shrink in proportion to the replicas). A Service spreads requests
/// by count, not by their contexts, so the pools fill unevenly (0.3 to 0.9 at once on long
/// conversations). Taken proportionally, a mean of 0.7 lets drains refill the pools past the
/// guard's redline, and 0.5 holds; by the law, 0.7 holds on every replay of both traces
/// (docs/autoscaling.md, "A second workload: conversations" and "The load share").
pub const TARGET_KV_USAGE_PROPORTIONAL: f64 = 0.5;
pub const TARGET_KV_USAGE_BY_LOAD: f64 = 0.7;

/// The default target KV usage for a replica whose fixed step cost is (`true`) or is not
/// known.
pub fn default_target_kv_usage(knows_step_seconds: bool) -> f64 {
    if knows_step_seconds {
        TARGET_KV_USAGE_BY_LOAD
    } else {
        TARGET_KV_USAGE_PROPORTIONAL
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemandConfig {
    pub capacity: ReplicaCapacity,
    /// Share of a replica's capacity the policy plans to use (the rest absorbs bursts while new
    /// replicas start).
    pub target_utilization: f64,
    /// KV usage each pod is steered towards ([`default_target_kv_usage`]).
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
    /// The KV term alone, summed over the pods (`kv_need`), in replicas.
    pub kv_replicas: f64,
    /// The part of the KV term that rises as the pools fill (`kv_fill`): what lean sizing
    /// extrapolates.
    pub kv_fill: f64,
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
        let share = load_share(p, &c.capacity);
        let by_kv = kv_need(kv, share, c.target_kv_usage);
        d.replicas += by_compute.max(by_kv);
        d.kv_replicas += by_kv;
        d.kv_fill += kv_fill(kv, share, c.target_kv_usage);
        d.compute += compute;
        kv_sum += kv;
        d.pods += 1;
    }
    if d.pods > 0 {
        d.kv_usage = kv_sum / d.pods as f64;
    }
    d
}

/// Most of a pod's time `load_share` credits to its load. Near 1 a pool's size swings with
/// the slightest change of load, and the estimate with the noise of the window.
const MAX_LOAD_SHARE: f64 = 0.9;

/// The share of a pod's time its load's work takes: the time it spent stepping, less the
/// fixed cost of each step. A continuous-batching engine runs a step whatever the batch, and
/// the load's work (prefill chunks, each sequence's token, the context its attention reads)
/// stretches it: a busy engine's step is its fixed cost over `1 - share`. Weighed by time, not
/// by the sequences decoding in each step (which counts a burst of short answers many times
/// over). `0` without the step histogram or the fixed cost.
fn load_share(p: &PodSignals, cap: &ReplicaCapacity) -> f64 {
    match (p.busy_share, p.steps_per_second, cap.step_seconds) {
        (Some(busy), Some(steps), Some(step)) => (busy - steps * step).clamp(0.0, MAX_LOAD_SHARE),
        _ => 0.0,
    }
}

/// A pod's KV need in replicas: how many of its kind would hold its load with each pool at
/// `target`. A sequence holds its blocks while it decodes, and it decodes at the stretched
/// step, so a pool holds `a x share / (1 - share)` (Little's law; `a` is the workload's: its
/// sequences' context over the pool, per fixed step). Spread over `f` times the replicas the
/// share is divided by `f`; solving for the usage at `target` gives
/// `share + usage x (1 - share) / target`. A straight `usage / target` (share 0) takes the
/// pools to shrink in proportion: they shrink more, so it buys too many replicas for a full
/// pool, and a drain it allows refills the rest past their target (docs/autoscaling.md,
/// "Pools as queues").
fn kv_need(usage: f64, share: f64, target: f64) -> f64 {
    share + usage * (1.0 - share) / target.max(1e-3)
}

/// `kv_need` as far as it measures the pools filling, for their rise over the horizon.
/// Its usage part is the pools themselves; its share part is the load's work, whose rise is a
/// compute trend (a burst of prompts stretches the steps for a few seconds, and waits in the
/// queue) until the pools hold half their target, and from there the stock of sequences in
/// flight that stretches the steps. Measured with `redline-sim`: the share's whole rise
/// made the code trace's near-empty pools (9%) call for a replica over a 120 s horizon
/// (docs/autoscaling.md, "The load share").
fn kv_fill(usage: f64, share: f64, target: f64) -> f64 {
    let target = target.max(1e-3);
    usage * (1.0 - share) / target + share * (usage / (FILL_SHARE_FROM * target)).min(1.0)
}

/// The share of its target a pool holds from which `kv_fill` takes the whole share's rise.
const FILL_SHARE_FROM: f64 = 0.5;

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
    use proptest::prelude::*;

    fn cfg() -> DemandConfig {
        DemandConfig {
            capacity: ReplicaCapacity {
                prompt_tokens_per_second: 1000.0,
                generation_tokens_per_second: 100.0,
                step_seconds: None,
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
            lame_duck: false,
            waiting_tokens: Some(0),
            prompt_tokens_per_second: Some(prompt),
            generation_tokens_per_second: Some(gen),
            preemptions_per_second: 0.0,
            level: Level::Ok,
            arrival_peaks: Vec::new(),
            late_per_second: None,
            first_tokens_per_second: None,
            busy_share: None,
            steps_per_second: None,
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

    fn busy(mut p: PodSignals, busy: f64, steps: f64) -> PodSignals {
        p.busy_share = Some(busy);
        p.steps_per_second = Some(steps);
        p
    }

    #[test]
    fn the_load_share_is_the_time_stepping_less_each_steps_fixed_cost() {
        let mut c = cfg();
        let p = busy(pod(0.0, 0.0, 0.4), 0.5, 40.0);
        // Without the fixed cost the pools shrink in proportion: 0.4 / 0.8.
        assert!((demand(std::slice::from_ref(&p), &c).kv_replicas - 0.5).abs() < 1e-12);
        c.capacity.step_seconds = Some(0.005);
        let d = demand(std::slice::from_ref(&p), &c);
        // Busy half the time, 40 steps of 5 ms fixed cost: 0.3 of it is the load's work.
        let share = load_share(&p, &c.capacity);
        assert!((share - 0.3).abs() < 1e-12, "{share}");
        assert!((d.kv_replicas - (0.3 + 0.4 * 0.7 / 0.8)).abs() < 1e-12);
        // An engine stepping back to back is at most MAX_LOAD_SHARE loaded; one that only
        // pays fixed costs (a lone short sequence) is not loaded at all.
        let full = busy(pod(0.0, 0.0, 0.4), 1.0, 10.0);
        assert_eq!(load_share(&full, &c.capacity), MAX_LOAD_SHARE);
        let idle = busy(pod(0.0, 0.0, 0.4), 0.2, 40.0);
        assert_eq!(load_share(&idle, &c.capacity), 0.0);
        // A sidecar that cannot say (vLLM): proportional again.
        let mut p = p;
        p.busy_share = None;
        assert!((demand(&[p], &c).kv_replicas - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_fill_takes_the_loads_rise_only_once_the_pools_hold_half_their_target() {
        // Empty pools fill nothing, however busy the engine (a prefill burst).
        assert_eq!(kv_fill(0.0, 0.8, 0.7), 0.0);
        // Small pools: their usage part and a share of the load in proportion.
        let f = kv_fill(0.07, 0.5, 0.7);
        assert!((f - (0.07 * 0.5 / 0.7 + 0.5 * 0.2)).abs() < 1e-12, "{f}");
        // From half the target on, the whole need.
        for u in [0.35, 0.5, 0.9] {
            assert!((kv_fill(u, 0.4, 0.7) - kv_need(u, 0.4, 0.7)).abs() < 1e-12);
        }
    }

    proptest! {
        /// Pools that follow Little's law with the stretched step (`usage = a x share /
        /// (1 - share)`, one `a` for the workload) sit exactly at the target when the load
        /// is spread over the replicas the KV need asks for, from any fleet size: the need
        /// inverts the law. A proportional rescale of pools under their target drains too
        /// far: they refill past it.
        #[test]
        fn the_kv_need_sizes_pools_that_follow_the_law_to_the_target(
            a in 0.01f64..2.0,
            share in 0.01f64..0.85,
            pods in 1usize..12,
            target in 0.3f64..0.95,
        ) {
            let usage = a * share / (1.0 - share);
            prop_assume!(usage < 1.0);
            let need = pods as f64 * kv_need(usage, share, target);
            // The same load over `need` replicas: each pod's share scales by pods / need.
            let spread = share * pods as f64 / need;
            prop_assert!(spread < 1.0);
            let at_need = a * spread / (1.0 - spread);
            prop_assert!((at_need - target).abs() < 1e-9, "{} at {} replicas", at_need, need);
            let proportional = pods as f64 * usage / target;
            let spread = share * pods as f64 / proportional;
            if spread < 1.0 {
                prop_assert!(a * spread / (1.0 - spread) > target || usage > target);
            }
        }

        /// The need grows with the usage and never falls under the load share (the replicas
        /// its work takes at full time), and the fill is within the need.
        #[test]
        fn the_kv_need_is_monotone_and_the_fill_within_it(
            u in 0.0f64..1.0,
            du in 0.0f64..0.5,
            share in 0.0f64..0.9,
            target in 0.05f64..0.99,
        ) {
            let need = kv_need(u, share, target);
            prop_assert!(kv_need(u + du, share, target) >= need);
            prop_assert!(need >= share);
            prop_assert!(kv_fill(u, share, target) <= need + 1e-12);
            prop_assert!(kv_fill(u, share, target) >= 0.0);
        }
    }
}
