//! The engine's arrival curve, from its counter of prompt tokens received.
//!
//! A token rate averaged over seconds says how much work comes, not how it comes. Whether a
//! queue keeps its TTFT objective depends on the largest burst: the most tokens that land
//! within any short window. For each window of [`ARRIVAL_WINDOWS_SECONDS`] this keeps the
//! most tokens that arrived within one such window ending in the last `memory` seconds, so
//! every burst is seen by at least one of the operator's reads.

use std::collections::VecDeque;

use redline_api::{ArrivalPeak, ARRIVAL_WINDOWS_SECONDS};

#[derive(Debug, Clone)]
pub struct ArrivalCurve {
    memory_seconds: f64,
    /// (time, counter) samples, enough to cover the longest window before the memory.
    samples: VecDeque<(f64, u64)>,
}

impl ArrivalCurve {
    pub fn new(memory_seconds: f64) -> Self {
        Self {
            memory_seconds,
            samples: VecDeque::new(),
        }
    }

    /// Feeds the counter read at `now`; returns the peaks, empty when the engine does not
    /// export the counter or there is only one sample. A counter that went down (an engine
    /// restart) starts afresh.
    pub fn observe(&mut self, now: f64, total: Option<u64>) -> Vec<ArrivalPeak> {
        let Some(v) = total else {
            self.samples.clear();
            return Vec::new();
        };
        if self.samples.back().is_some_and(|&(t, c)| c > v || t > now) {
            self.samples.clear();
        }
        self.samples.push_back((now, v));
        let longest = ARRIVAL_WINDOWS_SECONDS.iter().copied().fold(0.0, f64::max);
        // Keep one sample at or before the start of the oldest window we still measure.
        let horizon = now - self.memory_seconds - longest;
        while self.samples.get(1).is_some_and(|&(t, _)| t <= horizon) {
            self.samples.pop_front();
        }
        if self.samples.len() < 2 {
            return Vec::new();
        }
        ARRIVAL_WINDOWS_SECONDS
            .iter()
            .map(|&w| ArrivalPeak {
                window_seconds: w,
                tokens: self.peak(now, w),
            })
            .collect()
    }

    /// The most tokens counted between a sample ending in the memory and the last sample at
    /// least `window` before it (so a window of up to `window` plus one scrape interval).
    /// Before the first sample nothing is known: the first sample stands in for it.
    fn peak(&self, now: f64, window: f64) -> u64 {
        let s = &self.samples;
        let mut j = 0;
        let mut best = 0;
        for (i, &(t, c)) in s.iter().enumerate() {
            while j + 1 < i && s[j + 1].0 <= t - window {
                j += 1;
            }
            if now - t <= self.memory_seconds {
                best = best.max(c - s[j.min(i)].1);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peaks(curve: &mut ArrivalCurve, reads: &[(f64, u64)]) -> Vec<u64> {
        let mut out = Vec::new();
        for &(t, c) in reads {
            out = curve.observe(t, Some(c));
        }
        out.iter().map(|p| p.tokens).collect()
    }

    #[test]
    fn a_burst_shows_in_the_short_windows_and_a_rate_in_the_long_ones() {
        // 1000 tokens per second, read every 250 ms for 40 s, and 20,000 more at once at 39 s.
        let mut c = ArrivalCurve::new(10.0);
        let reads: Vec<(f64, u64)> = (0..=160)
            .map(|i| {
                let t = i as f64 * 0.25;
                let burst = if t >= 39.0 { 20_000 } else { 0 };
                (t, (t * 1000.0) as u64 + burst)
            })
            .collect();
        let p = peaks(&mut c, &reads);
        assert_eq!(p.len(), ARRIVAL_WINDOWS_SECONDS.len());
        // 0.5 s window: the burst and the 0.5 s of rate around it (one scrape interval more at
        // most).
        assert!((20_500..=20_750).contains(&p[0]), "{p:?}");
        // 32 s: the burst and 32 s of rate.
        assert!((52_000..=52_250).contains(&p[6]), "{p:?}");
        // The peaks never shrink with a longer window.
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
    }

    #[test]
    fn a_burst_is_remembered_for_the_memory_then_forgotten() {
        let mut c = ArrivalCurve::new(10.0);
        let mut reads = vec![(0.0, 0), (0.25, 0), (0.5, 5000)];
        reads.extend((3..200).map(|i| (i as f64 * 0.25, 5000)));
        let at = |n: usize| {
            let mut c = ArrivalCurve::new(10.0);
            peaks(&mut c, &reads[..n])[0]
        };
        assert_eq!(at(3), 5000);
        assert_eq!(at(43), 5000, "remembered 10 s after the read that saw it");
        // The read at 0.75 s still counts it (0.5 s window from the read at 0.25 s).
        assert_eq!(at(45), 0, "forgotten 10.25 s after that read");
        assert_eq!(peaks(&mut c, &reads)[6], 0, "nothing in 32 s + the memory");
    }

    #[test]
    fn no_counter_or_a_restart_gives_no_curve_until_two_samples() {
        let mut c = ArrivalCurve::new(10.0);
        assert!(c.observe(0.0, None).is_empty());
        assert!(c.observe(0.25, Some(100)).is_empty());
        assert!(!c.observe(0.5, Some(300)).is_empty());
        assert!(c.observe(0.75, Some(10)).is_empty(), "restarted");
        let p = c.observe(1.0, Some(60));
        assert_eq!(p[0].tokens, 50, "counted from the restart");
    }

    proptest! {
        /// Against a brute force over every pair of samples: the peak is the most any span of
        /// at least the window (within one sample of it) holds, ending in the memory.
        #[test]
        fn peaks_match_a_brute_force(
            steps in proptest::collection::vec((0.05f64..1.0, 0u64..5000), 2..200),
            memory in 1.0f64..20.0,
        ) {
            let mut c = ArrivalCurve::new(memory);
            let (mut t, mut v) = (0.0, 0u64);
            let mut all = vec![(t, v)];
            let mut got = c.observe(t, Some(v));
            for (dt, dv) in steps {
                t += dt;
                v += dv;
                all.push((t, v));
                got = c.observe(t, Some(v));
            }
            for p in got {
                let w = p.window_seconds;
                let mut want = 0;
                for (i, &(ti, ci)) in all.iter().enumerate() {
                    if t - ti > memory { continue; }
                    // The latest sample at least `w` before ti, else the first one.
                    let start = all[..i].iter().rev().find(|s| s.0 <= ti - w).unwrap_or(&all[0]);
                    want = want.max(ci - start.1);
                }
                prop_assert_eq!(p.tokens, want, "window {}", w);
            }
        }
    }
}
