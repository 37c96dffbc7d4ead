//! The SLO's error budget, and how much margin it asks the policy to plan with.
//!
//! A TTFT objective at p99 allows 1% of requests late. The engines count the requests whose
//! first token came after the objective, and all first tokens; summed over the pods and over a
//! rolling window, their ratio against the 1% is the **burn rate** (1.0: the budget is spent
//! as fast as it accrues). While nothing burns, the policy plans lean: bursts the queue absorbs
//! buy no replicas. The first late requests in a clean window buy one catch-up (the recent
//! burst sized again with margin); a burn rate over 1 keeps the margin until it falls back.
//! No other autoscaler reads its own SLO this way: KServe, KEDA and Dynamo's planner size by
//! load alone, so they carry the margin all the time.

use std::collections::VecDeque;

/// How the policy sizes the fleet now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    /// No TTFT objective: the load-only forecast with its trend (the policy's choice; the
    /// budget has nothing to say then).
    Reactive,
    /// Nothing burns: full measured capacity, no trend, a capped burst reserve.
    Lean,
    /// The budget burns: the trend forecast with a margin for the cold start.
    Guarded,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Share of requests allowed late (0.01 for a p99 objective).
    pub allowed_late: f64,
    /// The budget is counted over this rolling window.
    pub window_seconds: f64,
    /// Burn rate at which the first late requests of a clean window buy a catch-up.
    pub warn_burn: f64,
    /// How long that catch-up lasts.
    pub catch_up_seconds: f64,
    /// Burn rate over which the margin stays on.
    pub overspent_burn: f64,
    /// The longest interval between two observations that is counted: the rates seen are the
    /// engines' last few seconds, so a gap nobody observed (passes that failed, an operator
    /// away, a slow takeover) counts this long, not as long as it lasted.
    pub max_interval_seconds: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            allowed_late: 0.01,
            window_seconds: 3600.0,
            warn_burn: 0.3,
            catch_up_seconds: 60.0,
            overspent_burn: 1.0,
            max_interval_seconds: 20.0,
        }
    }
}

/// What an [`ErrorBudget`] hands to its successor (a new leader): the window's counts in spans
/// of [`SPAN_SECONDS`], and the times it keys on, as ages in seconds before the `now` it was
/// taken at (a new process has a clock of its own).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BudgetMemory {
    /// Oldest first.
    pub spans: Vec<BudgetSpan>,
    pub last_late_age: Option<f64>,
    pub catch_up_age: Option<f64>,
    /// The last observation: the successor counts the rates it then sees over the time since
    /// (up to `max_interval_seconds`). `None` (a memory written a while before it was taken):
    /// the successor counts from its own first observation.
    pub last_seen_age: Option<f64>,
}

/// Late requests and first tokens counted within one span, and the age of its newest count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetSpan {
    pub age: f64,
    pub late: f64,
    pub first: f64,
}

/// The counts a [`BudgetMemory`] keeps are summed over spans this long: a few dozen numbers
/// for an hour's window, not one per decision. A restored span leaves the window when its
/// newest count would, so the budget a successor sees errs on the side of a margin.
pub const SPAN_SECONDS: f64 = 300.0;

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorBudget {
    cfg: BudgetConfig,
    /// (time, late, first tokens) counted since the previous entry.
    counts: VecDeque<(f64, f64, f64)>,
    late: f64,
    first: f64,
    /// When the last late request was counted: the window is clean once it has left.
    last_late: Option<f64>,
    /// When the current catch-up began; `None` while armed (the window is clean).
    catch_up_since: Option<f64>,
    last: Option<f64>,
}

impl ErrorBudget {
    pub fn new(cfg: BudgetConfig) -> Self {
        Self {
            cfg,
            counts: VecDeque::new(),
            late: 0.0,
            first: 0.0,
            last_late: None,
            catch_up_since: None,
            last: None,
        }
    }

    /// The burn rate over the window: late requests over the ones the budget allows (at least
    /// one, so the first late request of a quiet start is not an infinite burn).
    pub fn burn(&self) -> f64 {
        self.late / (self.cfg.allowed_late * self.first).max(1.0)
    }

    pub fn config(&self) -> BudgetConfig {
        self.cfg
    }

    /// What a successor needs to go on from here (see [`BudgetMemory`]). Spans are cut on
    /// this clock's multiples of [`SPAN_SECONDS`], so only the newest changes from one
    /// decision to the next.
    pub fn memory(&self, now: f64) -> BudgetMemory {
        let mut spans: Vec<(i64, BudgetSpan)> = Vec::new();
        for &(t, late, first) in &self.counts {
            let id = (t / SPAN_SECONDS).floor() as i64;
            match spans.last_mut() {
                Some((last, s)) if *last == id => {
                    s.age = now - t;
                    s.late += late;
                    s.first += first;
                }
                _ => spans.push((
                    id,
                    BudgetSpan {
                        age: now - t,
                        late,
                        first,
                    },
                )),
            }
        }
        BudgetMemory {
            spans: spans.into_iter().map(|(_, s)| s).collect(),
            last_late_age: self.last_late.map(|t| now - t),
            catch_up_age: self.catch_up_since.map(|t| now - t),
            last_seen_age: self.last.map(|t| now - t),
        }
    }

    /// A budget that goes on from `m`, taken by another at `now` on this clock. Ages under 0
    /// (clocks that disagree) count as now; spans past the window are left out.
    pub fn restore(cfg: BudgetConfig, m: &BudgetMemory, now: f64) -> Self {
        let at = |age: f64| now - age.max(0.0);
        let mut b = Self::new(cfg);
        let mut spans: Vec<&BudgetSpan> = m
            .spans
            .iter()
            .filter(|s| s.age.max(0.0) <= cfg.window_seconds)
            .collect();
        spans.sort_by(|a, b| b.age.total_cmp(&a.age));
        for s in spans {
            let (late, first) = (s.late.max(0.0), s.first.max(0.0));
            b.counts.push_back((at(s.age), late, first));
            b.late += late;
            b.first += first;
        }
        // A span's counts are restored at its newest count's time, so the last late request
        // is no older than the newest span that holds one: else the window would be called
        // clean (and its late count zeroed) while such a span is still in it.
        let newest_late = b.counts.iter().filter(|c| c.1 > 0.0).map(|c| c.0);
        b.last_late = m
            .last_late_age
            .map(at)
            .into_iter()
            .chain(newest_late)
            .reduce(f64::max);
        b.catch_up_since = m.catch_up_age.map(at);
        b.last = m.last_seen_age.map(at);
        b
    }

    /// Counts the fleet's late and first-token rates at `now` (per second, summed over the
    /// pods) and says how to size; `None` when no pod counts late requests (nothing to size
    /// by).
    pub fn observe(&mut self, now: f64, rates: Option<(f64, f64)>) -> Option<Sizing> {
        let Some((late, first)) = rates else {
            self.last = Some(now);
            return None;
        };
        // A clock that went back: start the window afresh.
        if self.last.is_some_and(|t| t > now) {
            *self = Self::new(self.cfg);
        }
        let dt = self
            .last
            .map_or(0.0, |t| now - t)
            .min(self.cfg.max_interval_seconds);
        self.last = Some(now);
        let (late, first) = (late.max(0.0) * dt, first.max(0.0) * dt);
        self.counts.push_back((now, late, first));
        if late > 0.0 {
            self.last_late = Some(now);
        }
        self.late += late;
        self.first += first;
        while self
            .counts
            .front()
            .is_some_and(|&(t, _, _)| now - t > self.cfg.window_seconds)
        {
            let (_, l, f) = self.counts.pop_front().expect("checked");
            self.late -= l;
            self.first -= f;
        }
        // Sums of floats drift: a window with no late request left is clean.
        if self
            .last_late
            .is_none_or(|t| now - t > self.cfg.window_seconds)
        {
            self.late = 0.0;
            self.catch_up_since = None;
        }
        let burn = self.burn();
        let guarded = burn > self.cfg.overspent_burn
            || (burn > self.cfg.warn_burn
                && now - *self.catch_up_since.get_or_insert(now) < self.cfg.catch_up_seconds);
        Some(if guarded {
            Sizing::Guarded
        } else {
            Sizing::Lean
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn budget() -> ErrorBudget {
        ErrorBudget::new(BudgetConfig::default())
    }

    /// The rates seen after a gap are the engines' last seconds, not the gap's: ten minutes
    /// nobody observed count as `max_interval_seconds` of them (before, as ten minutes, so a
    /// late rate seen once after an operator was away could overspend the hour's budget).
    #[test]
    fn a_gap_between_observations_counts_no_longer_than_the_limit() {
        let mut b = budget();
        b.observe(0.0, Some((0.0, 10.0)));
        // A successor handed the memory now, on a clock 600 s ahead.
        let mut r = ErrorBudget::restore(b.config(), &b.memory(0.0), 600.0);
        b.observe(600.0, Some((1.0, 10.0)));
        r.observe(1200.0, Some((1.0, 10.0)));
        let cap = BudgetConfig::default().max_interval_seconds;
        assert_eq!((b.late, b.first), (cap, 10.0 * cap));
        assert_eq!((r.late, r.first), (cap, 10.0 * cap));
    }

    #[test]
    fn no_late_counts_means_nothing_to_size_by() {
        assert_eq!(budget().observe(0.0, None), None);
    }

    #[test]
    fn first_late_requests_buy_one_catch_up_then_an_overspent_budget_keeps_the_margin() {
        let mut b = budget();
        // 10 first tokens a second, none late, for 100 s: 1000 served, 10 allowed.
        for t in 0..=20 {
            assert_eq!(
                b.observe(t as f64 * 5.0, Some((0.0, 10.0))),
                Some(Sizing::Lean)
            );
        }
        // 4 late in the next 5 s: burn 0.4, over the warning: a catch-up of 60 s.
        assert_eq!(b.observe(105.0, Some((0.8, 10.0))), Some(Sizing::Guarded));
        assert!((b.burn() - 4.0 / 10.5).abs() < 1e-9);
        assert_eq!(b.observe(160.0, Some((0.0, 0.0))), Some(Sizing::Guarded));
        assert_eq!(
            b.observe(170.0, Some((0.0, 0.0))),
            Some(Sizing::Lean),
            "one catch-up"
        );
        // 10 more late: the budget is overspent, the margin stays while it is.
        assert_eq!(b.observe(175.0, Some((2.0, 10.0))), Some(Sizing::Guarded));
        assert!(b.burn() > 1.0);
        assert_eq!(b.observe(600.0, Some((0.0, 0.0))), Some(Sizing::Guarded));
    }

    #[test]
    fn the_window_forgets_and_a_clean_window_rearms_the_catch_up() {
        let mut b = ErrorBudget::new(BudgetConfig {
            window_seconds: 100.0,
            ..BudgetConfig::default()
        });
        b.observe(0.0, Some((0.0, 100.0)));
        assert_eq!(b.observe(5.0, Some((1.0, 100.0))), Some(Sizing::Guarded));
        assert_eq!(b.observe(70.0, Some((0.0, 100.0))), Some(Sizing::Lean));
        // The late requests leave the window: clean again, armed again.
        assert_eq!(b.observe(110.0, Some((0.0, 100.0))), Some(Sizing::Lean));
        assert_eq!(b.burn(), 0.0);
        assert_eq!(b.observe(115.0, Some((10.0, 100.0))), Some(Sizing::Guarded));
    }

    proptest! {
        /// A budget restored from another's memory, on a clock of its own, burns as the other
        /// does and sizes alike at the handover, however the counts fell into spans.
        #[test]
        fn a_restored_budget_goes_on_from_the_memory(
            // Late requests in some steps only: a span's newest count is often not a late one.
            steps in prop::collection::vec(
                (1.0f64..120.0, prop_oneof![2 => Just(0.0), 1 => 0.0f64..3.0], 0.0f64..50.0),
                1..200,
            ),
            shift in -5000.0f64..5000.0,
            next in (0.0f64..3.0, 0.0f64..50.0),
        ) {
            let mut b = budget();
            let mut now = 0.0;
            b.observe(now, Some((0.0, 0.0)));
            for (dt, late, first) in steps {
                now += dt;
                b.observe(now, Some((late, first)));
            }
            let m = b.memory(now);
            prop_assert!(m.spans.len() as f64 <= 3600.0 / SPAN_SECONDS + 2.0, "{}", m.spans.len());
            let mut r = ErrorBudget::restore(BudgetConfig::default(), &m, now + shift);
            prop_assert!((r.burn() - b.burn()).abs() < 1e-6 * b.burn().max(1.0), "{} vs {}", r.burn(), b.burn());
            prop_assert_eq!(r.observe(now + shift, Some(next)), b.observe(now, Some(next)));
            // Nothing late for over an hour after: the restored window's counts leave it and
            // its late count with them, never under 0 (a span restored later than the last
            // late request it holds must not be called clean before it has left).
            for i in 1..=40 {
                r.observe(now + shift + 100.0 * i as f64, Some((0.0, 10.0)));
                let recount: f64 = r.counts.iter().map(|c| c.1).sum();
                prop_assert!(r.late >= 0.0 && (r.late - recount).abs() < 1e-6, "{} vs {}", r.late, recount);
            }
            prop_assert_eq!(r.burn(), 0.0);
        }

        /// The burn rate is the window's late count over its allowance, recounted from
        /// scratch: the running sums never drift from it, and the sizing follows it.
        #[test]
        fn the_burn_rate_matches_a_recount(
            steps in prop::collection::vec((1.0f64..30.0, 0.0f64..3.0, 0.0f64..50.0), 1..200),
        ) {
            let cfg = BudgetConfig { window_seconds: 600.0, ..BudgetConfig::default() };
            let mut b = ErrorBudget::new(cfg);
            let mut now = 0.0;
            b.observe(now, Some((0.0, 0.0)));
            let mut seen = Vec::new();
            for (dt, late, first) in steps {
                now += dt;
                let sizing = b.observe(now, Some((late, first)));
                let counted = dt.min(cfg.max_interval_seconds);
                seen.push((now, late * counted, first * counted));
                let inside = seen.iter().filter(|s| now - s.0 <= cfg.window_seconds);
                let (l, f) = inside.fold((0.0, 0.0), |a, s| (a.0 + s.1, a.1 + s.2));
                let burn = l / (cfg.allowed_late * f).max(1.0);
                prop_assert!((b.burn() - burn).abs() < 1e-6 * burn.max(1.0));
                if burn > cfg.overspent_burn + 1e-6 {
                    prop_assert_eq!(sizing, Some(Sizing::Guarded));
                }
                if burn <= cfg.warn_burn - 1e-6 {
                    prop_assert_eq!(sizing, Some(Sizing::Lean));
                }
            }
        }
    }
}
