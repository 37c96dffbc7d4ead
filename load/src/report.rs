//! What a run shows: the live row, the guard's reaction to each redline crossing, and the
//! summary table. Pure functions of the recorded [`Run`].

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::observe::{PodSample, Sample};
use crate::run::Run;
use redline_operator::crd::late_requests_text;
use redline_sim::report::quantile;

pub const LIVE_HEADER: &str =
    "     t   req/s  in-flight  desired  pods  ready  KV max  KV mean    late  last decision";

pub fn live_row(s: &Sample) -> String {
    format!(
        "{:>5.0}s {:>7.1} {:>10} {:>8} {:>5} {:>6} {:>6.0}% {:>7.0}% {:>7}  {}",
        s.t,
        s.arrival_rate,
        s.in_flight,
        s.desired,
        s.pods,
        s.ready,
        s.kv_max * 100.0,
        s.kv_mean * 100.0,
        s.late_per_second.map_or("-".into(), late_requests_text),
        s.decision.as_deref().unwrap_or("-")
    )
}

/// A pod's KV usage reaching the guard's redline, and how long after it the guard had cut
/// admission (`None`: it never did while the episode lasted).
#[derive(Debug, Clone, PartialEq)]
pub struct Reaction {
    pub pod: String,
    pub at: f64,
    pub seconds: Option<f64>,
}

/// A guard action this long before the crossing counts as acting on it (the guard acts on the
/// forecast, before the redline is reached).
const LOOKBACK: f64 = 3.0;
/// How long after a crossing an action is looked for.
const LOOKAHEAD: f64 = 5.0;

/// Every crossing of `redline` by a pod's KV usage, with the guard's reaction: the first
/// sample from the crossing on where the sidecar had cut limits since `LOOKBACK` before it, or
/// admission was already held at the running count.
pub fn guard_reactions(pods: &BTreeMap<String, Vec<PodSample>>, redline: f64) -> Vec<Reaction> {
    let mut out = Vec::new();
    for (pod, s) in pods {
        for i in 0..s.len() {
            let crossing = s[i].kv >= redline && (i == 0 || s[i - 1].kv < redline);
            if !crossing {
                continue;
            }
            let t0 = s[i].t;
            let before = s[..i]
                .iter()
                .rev()
                .find(|p| p.t <= t0 - LOOKBACK)
                .map_or(0, |p| p.guard_down);
            let held = |p: &PodSample| {
                p.guard_down > before || p.max_num_seqs.is_some_and(|m| u64::from(m) <= p.running)
            };
            let seconds = s[i..]
                .iter()
                .take_while(|p| p.t <= t0 + LOOKAHEAD)
                .find(|p| held(p))
                .map(|p| p.t - t0);
            out.push(Reaction {
                pod: pod.clone(),
                at: t0,
                seconds,
            });
        }
    }
    out
}

/// A counter's growth over a pod's samples, summed over pods.
fn growth(pods: &BTreeMap<String, Vec<PodSample>>, f: impl Fn(&PodSample) -> u64) -> u64 {
    pods.values()
        .filter_map(|s| Some(f(s.last()?).saturating_sub(f(s.first()?))))
        .sum()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub requests: usize,
    pub replay_seconds: f64,
    pub answered: usize,
    pub failed: usize,
    /// Requests a pod refused before accepting (draining, gone) and another pod answered.
    pub rerouted: usize,
    pub ttft_p50: Option<f64>,
    pub ttft_p99: Option<f64>,
    /// Share of answered requests with a time to first token within the SLO.
    pub ttft_slo_attainment: Option<f64>,
    pub peak_desired: i32,
    pub peak_ready: usize,
    /// Pods that existed (starting, ready or draining) integrated over the replay.
    pub replica_seconds: f64,
    pub preemptions: u64,
    pub guard_actions: u64,
    /// The guard's cuts timed by the sidecars (pressure seen -> engine ack), and those that
    /// took more than a second.
    pub guard_cuts_timed: u64,
    pub guard_cuts_over_1s: u64,
    pub redline_crossings: usize,
    /// The slowest guard reaction to a crossing (`None`: no crossing).
    pub slowest_guard_reaction: Option<f64>,
    pub unanswered_crossings: usize,
    pub kv_peak: f64,
    pub scale_ups: usize,
    pub drains: usize,
    pub scale_downs: usize,
}

pub fn summarize(run: &Run, ttft_slo: f64, redline: f64) -> Summary {
    let answered: Vec<_> = run
        .requests
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    let ttfts: Vec<f64> = answered.iter().filter_map(|a| a.ttft).collect();
    let quantile = |q| (!ttfts.is_empty()).then(|| quantile(ttfts.clone(), q));
    let reactions = guard_reactions(&run.pods, redline);
    let mut replica_seconds = 0.0;
    for w in run.samples.windows(2) {
        if w[0].t < run.replay_seconds {
            replica_seconds += w[0].pods as f64 * (w[1].t.min(run.replay_seconds) - w[0].t);
        }
    }
    let count = |reason: &str| {
        run.events
            .iter()
            .filter(|e| e.reason == reason)
            .map(|e| e.count as usize)
            .sum()
    };
    Summary {
        requests: run.requests.len(),
        replay_seconds: run.replay_seconds,
        answered: answered.len(),
        failed: run.requests.len() - answered.len(),
        rerouted: run.requests.iter().filter(|r| r.retries > 0).count(),
        ttft_p50: quantile(0.5),
        ttft_p99: quantile(0.99),
        ttft_slo_attainment: (!ttfts.is_empty())
            .then(|| ttfts.iter().filter(|&&t| t <= ttft_slo).count() as f64 / ttfts.len() as f64),
        peak_desired: run.samples.iter().map(|s| s.desired).max().unwrap_or(0),
        peak_ready: run.samples.iter().map(|s| s.ready).max().unwrap_or(0),
        replica_seconds,
        preemptions: growth(&run.pods, |p| p.preemptions),
        guard_actions: growth(&run.pods, |p| p.guard_down),
        guard_cuts_timed: growth(&run.pods, |p| p.guard_timed),
        guard_cuts_over_1s: growth(&run.pods, |p| p.guard_timed)
            .saturating_sub(growth(&run.pods, |p| p.guard_within_1s)),
        redline_crossings: reactions.len(),
        slowest_guard_reaction: reactions.iter().filter_map(|r| r.seconds).reduce(f64::max),
        unanswered_crossings: reactions.iter().filter(|r| r.seconds.is_none()).count(),
        kv_peak: run
            .pods
            .values()
            .flatten()
            .map(|p| p.kv)
            .fold(0.0, f64::max),
        scale_ups: count("ScaledUp"),
        drains: count("Draining"),
        scale_downs: count("ScaledDown"),
    }
}

pub fn table(s: &Summary, ttft_slo: f64) -> String {
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} s"));
    let rows: Vec<(String, String)> = vec![
        (
            "requests (answered / failed)".into(),
            format!("{} ({} / {})", s.requests, s.answered, s.failed),
        ),
        (
            "rerouted (a draining pod refused, another answered)".into(),
            s.rerouted.to_string(),
        ),
        (
            "replay: first arrival to last answer".into(),
            format!("{:.0} s", s.replay_seconds),
        ),
        (
            "TTFT p50 / p99".into(),
            format!("{} / {}", secs(s.ttft_p50), secs(s.ttft_p99)),
        ),
        (
            format!("TTFT within {ttft_slo} s"),
            s.ttft_slo_attainment
                .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
        ),
        (
            "replicas: peak desired / peak ready".into(),
            format!("{} / {}", s.peak_desired, s.peak_ready),
        ),
        (
            "replica-seconds (during the replay)".into(),
            format!("{:.0}", s.replica_seconds),
        ),
        (
            "scale-ups / drains / scale-downs (Events)".into(),
            format!("{} / {} / {}", s.scale_ups, s.drains, s.scale_downs),
        ),
        (
            "peak KV usage of any pod".into(),
            format!("{:.0}%", s.kv_peak * 100.0),
        ),
        ("preemptions (KV ran out)".into(), s.preemptions.to_string()),
        (
            "guard cuts (sidecar, fast loop)".into(),
            s.guard_actions.to_string(),
        ),
        (
            "guard cuts timed / over 1 s (pressure seen -> engine ack)".into(),
            format!("{} / {}", s.guard_cuts_timed, s.guard_cuts_over_1s),
        ),
        (
            "redline crossings / slowest guard reaction".into(),
            format!(
                "{} / {}",
                s.redline_crossings,
                secs(s.slowest_guard_reaction)
            ),
        ),
    ];
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<w$}  {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: f64, kv: f64, max: u32, running: u64, guard: u64) -> PodSample {
        PodSample {
            t,
            kv,
            running,
            waiting: 0,
            max_num_seqs: Some(max),
            preemptions: 0,
            guard_down: guard,
            guard_timed: 0,
            guard_within_1s: 0,
        }
    }

    fn reactions(s: Vec<PodSample>) -> Vec<Option<f64>> {
        let pods = BTreeMap::from([("a".to_string(), s)]);
        guard_reactions(&pods, 0.9)
            .into_iter()
            .map(|r| r.seconds)
            .collect()
    }

    #[test]
    fn a_cut_after_the_crossing_is_timed() {
        let s = vec![
            p(0.0, 0.5, 8, 4, 0),
            p(0.25, 0.92, 8, 6, 0),
            p(0.5, 0.95, 8, 6, 0),
            p(0.75, 0.95, 3, 6, 1),
        ];
        assert_eq!(reactions(s), vec![Some(0.5)]);
    }

    #[test]
    fn a_cut_on_the_forecast_counts_as_in_time() {
        let s = vec![
            p(0.0, 0.5, 8, 4, 0),
            p(1.0, 0.8, 3, 6, 1),
            p(2.0, 0.91, 3, 6, 1),
        ];
        assert_eq!(reactions(s), vec![Some(0.0)]);
    }

    #[test]
    fn a_cut_long_before_does_not_count_and_no_cut_is_none() {
        let s = vec![
            p(0.0, 0.5, 8, 4, 1),
            p(4.0, 0.5, 8, 4, 1),
            p(5.0, 0.95, 8, 6, 1),
            p(6.0, 0.95, 8, 6, 1),
        ];
        assert_eq!(reactions(s), vec![None]);
    }

    #[test]
    fn admission_already_held_at_the_running_count_counts() {
        let s = vec![p(0.0, 0.5, 8, 4, 0), p(1.0, 0.95, 6, 6, 0)];
        assert_eq!(reactions(s), vec![Some(0.0)]);
    }

    #[test]
    fn each_crossing_is_one_episode() {
        let s = vec![
            p(0.0, 0.95, 8, 4, 1),
            p(1.0, 0.5, 8, 4, 1),
            p(2.0, 0.95, 8, 4, 2),
        ];
        assert_eq!(reactions(s), vec![Some(0.0), Some(0.0)]);
    }
}
