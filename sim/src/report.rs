//! From simulated outcomes to the numbers that matter: SLO attainment, replica-seconds against
//! the oracle, redline events, failed requests, scaling actions and reversals.

use crate::fleet::{Outcome, Slo};

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub requests: usize,
    /// Shares of all requests (refused and failed ones miss).
    pub ttft_attainment: f64,
    pub itl_attainment: f64,
    pub ttft_p99_seconds: f64,
    pub replica_seconds: f64,
    /// Preemptions for lack of KV blocks plus requests refused for memory.
    pub redline_events: u64,
    pub failed: usize,
    pub scale_actions: u32,
    pub reversals: u32,
    /// The replay's length up to its last arrival (what reversals are counted over).
    pub duration_seconds: f64,
    /// The most reversals within any 10 minutes: the cap read strictly. The rate hides a
    /// cluster in a long replay, and over-counts one reversal in a replay shorter than 10
    /// minutes.
    pub most_reversals_in_10_min: u32,
    pub peak_kv_usage: f64,
    pub guard_actions: u64,
}

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
pub fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

pub fn summarize(o: &Outcome, slo: &Slo) -> Summary {
    let n = o.requests.len();
    let share = |k: usize| if n == 0 { 1.0 } else { k as f64 / n as f64 };
    // Served requests whose measure is within its objective (refused and failed ones miss).
    let within = |measure: fn(&crate::fleet::RequestRecord) -> Option<f64>, limit: f64| {
        o.requests
            .iter()
            .filter(|r| !r.refused && !r.failed)
            .filter(|r| measure(r).is_some_and(|t| t <= limit))
            .count()
    };
    let ttft_ok = within(crate::fleet::RequestRecord::ttft, slo.ttft_seconds);
    let itl_ok = within(crate::fleet::RequestRecord::mean_itl, slo.itl_seconds);
    let ttfts = o
        .requests
        .iter()
        .map(|r| r.ttft().unwrap_or(f64::INFINITY))
        .collect();
    let refused = o.requests.iter().filter(|r| r.refused).count();
    let failed = o
        .requests
        .iter()
        .filter(|r| r.failed || (!r.refused && r.finish.is_none()))
        .count();
    Summary {
        name: o.name.clone(),
        requests: n,
        ttft_attainment: share(ttft_ok),
        itl_attainment: share(itl_ok),
        ttft_p99_seconds: quantile(ttfts, 0.99),
        replica_seconds: o.replica_seconds,
        redline_events: o.preemptions + refused as u64,
        failed,
        scale_actions: o.scale_actions,
        reversals: o.reversals.len() as u32,
        duration_seconds: o.duration_seconds,
        most_reversals_in_10_min: most_within(&o.reversals, 600.0),
        peak_kv_usage: o.series.iter().map(|s| s.max_kv_usage).fold(0.0, f64::max),
        guard_actions: o.guard_actions,
    }
}

impl Summary {
    /// Reversals as a rate over the replay.
    pub fn reversals_per_10_min(&self) -> f64 {
        f64::from(self.reversals) / (self.duration_seconds / 600.0).max(1e-9)
    }
}

/// How full the pools ran and how long a sequence waited between tokens, up to the last
/// arrival: the mean KV usage over pods and time, the fullest pool's mean, and the mean
/// inter-token latency over every generated token after a first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pools {
    pub mean_kv_usage: f64,
    pub mean_fullest_kv_usage: f64,
    pub mean_inter_token_latency_seconds: f64,
    /// The load's work over the trace in replicas' worth ([`Outcome::load_seconds`] over the
    /// span): what the policy's load shares add up to, on average.
    pub mean_load: f64,
}

pub fn pools(o: &Outcome) -> Pools {
    let span: Vec<_> = o
        .series
        .iter()
        .filter(|s| s.t <= o.duration_seconds && s.ready > 0)
        .collect();
    let n = span.len().max(1) as f64;
    let (gaps, tokens) = o
        .requests
        .iter()
        .filter(|r| r.output_tokens > 1)
        .filter_map(|r| Some((r.finish? - r.first_token?, f64::from(r.output_tokens - 1))))
        .fold((0.0, 0.0), |(g, t), (dg, dt)| (g + dg, t + dt));
    Pools {
        mean_kv_usage: span.iter().map(|s| s.kv_usage).sum::<f64>() / n,
        mean_fullest_kv_usage: span.iter().map(|s| s.max_kv_usage).sum::<f64>() / n,
        mean_inter_token_latency_seconds: if tokens > 0.0 { gaps / tokens } else { 0.0 },
        mean_load: o.load_seconds / o.duration_seconds.max(1e-9),
    }
}

/// The most of `times` (ascending) within any window of `window` seconds.
pub fn most_within(times: &[f64], window: f64) -> u32 {
    let mut first = 0;
    let mut most = 0;
    for (i, &t) in times.iter().enumerate() {
        while t - times[first] >= window {
            first += 1;
        }
        most = most.max(i + 1 - first);
    }
    most as u32
}

/// One markdown table, ratios against `reference` (the oracle's replica-seconds).
pub fn table(rows: &[Summary], reference: Option<f64>) -> String {
    let mut s = String::from(
        "| policy | TTFT SLO | ITL SLO | TTFT p99 | replica-s | vs oracle | redline events | failed | scalings | reversals /10 min | most in 10 min | peak KV | guard actions |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let ratio = reference.map_or("-".to_string(), |o| {
            format!("{:.2}x", r.replica_seconds / o.max(1e-9))
        });
        let p99 = if r.ttft_p99_seconds.is_finite() {
            format!("{:.2} s", r.ttft_p99_seconds)
        } else {
            "never".into()
        };
        s += &format!(
            "| {} | {:.2}% | {:.2}% | {} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {:.0}% | {} |\n",
            r.name,
            r.ttft_attainment * 100.0,
            r.itl_attainment * 100.0,
            p99,
            r.replica_seconds,
            ratio,
            r.redline_events,
            r.failed,
            r.scale_actions,
            r.reversals_per_10_min(),
            r.most_reversals_in_10_min,
            r.peak_kv_usage * 100.0,
            r.guard_actions,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{RequestRecord, SamplePoint};

    #[test]
    fn pools_average_over_the_span_and_weigh_latency_by_token() {
        let sample = |t: f64, ready: u32, kv: f64, max: f64| SamplePoint {
            t,
            replicas: ready,
            ready,
            kv_usage: kv,
            max_kv_usage: max,
            waiting: 0,
        };
        let request = |first: f64, finish: f64, output_tokens: u32| RequestRecord {
            arrival: 0.0,
            first_token: Some(first),
            finish: Some(finish),
            output_tokens,
            refused: false,
            failed: false,
        };
        let o = Outcome {
            name: "x".into(),
            // Before the first pod is ready and after the last arrival: not counted.
            series: vec![
                sample(0.0, 0, 0.0, 0.0),
                sample(1.0, 2, 0.2, 0.3),
                sample(2.0, 2, 0.4, 0.5),
                sample(11.0, 2, 0.9, 0.9),
            ],
            // 10 gaps of 10 ms and 2 of 40 ms: 15 ms a token, where the requests' own means
            // (10 and 40 ms) would average 25.
            requests: vec![
                request(1.0, 1.1, 11),
                request(1.0, 1.08, 3),
                request(1.0, 1.0, 1),
            ],
            replica_seconds: 0.0,
            preemptions: 0,
            scale_actions: 0,
            reversals: Vec::new(),
            guard_actions: 0,
            duration_seconds: 10.0,
            scale_events: Vec::new(),
            // 15 engine-seconds of work in 10 s: one and a half replicas' worth.
            load_seconds: 15.0,
        };
        let p = pools(&o);
        assert!((p.mean_load - 1.5).abs() < 1e-12, "{p:?}");
        assert!((p.mean_kv_usage - 0.3).abs() < 1e-12, "{p:?}");
        assert!((p.mean_fullest_kv_usage - 0.4).abs() < 1e-12, "{p:?}");
        assert!(
            (p.mean_inter_token_latency_seconds - 0.015).abs() < 1e-12,
            "{p:?}"
        );
    }
}
