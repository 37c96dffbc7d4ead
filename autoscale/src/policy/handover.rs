//! What a policy hands to its successor: a new leader after a failover or a rolling update
//! of the operator goes on with the windows, the drains and the error budget of the old one,
//! instead of forgetting the budget it overspent (and sizing lean through the rest of a burst)
//! or the reversal it just made (and making another).
//!
//! The memory a leader keeps in status as it goes ([`Policy::memory`]) has no demand history:
//! a successor after a lost leader drains nothing until it has seen a whole scale-down window
//! of fresh data itself, as after any start, and its forecast starts from its own few samples.
//! So nothing in it lets a successor scale down sooner than a new policy would (it only
//! finishes the old one's drains); the windows, the reversals and the budget only hold it
//! back, or make it keep a margin.
//!
//! A leader that stops (a rolling update of the operator, a drained node) hands over the
//! history too ([`Policy::handover`]): its successor then decides as the old one would have,
//! where one without it, taking over mid-burst, sees only the burst's raw level and buys
//! replicas the old one would not have.

use std::collections::VecDeque;

use super::{Averaged, Draining, Policy, PolicyConfig, Sample, MAX_HOLD_FACTOR};
use crate::budget::{BudgetMemory, ErrorBudget};

/// One of the policy's demand samples as a successor takes it ([`Policy::handover`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleMemory {
    /// Seconds before the `now` the memory was taken at.
    pub age: f64,
    /// The load in replicas: as measured, averaged over the demand's smoothing window, and
    /// averaged again over the trend's (what the trend is fitted to).
    pub demand: [f64; 3],
    /// The KV term's fill, averaged the same two ways.
    pub kv: [f64; 3],
    /// The burst reserve in replicas, and the replicas asked for then.
    pub reserve: f64,
    pub desired: u32,
    /// The guarded forecast, and lean sizing's.
    pub guarded: f64,
    pub lean: f64,
    /// Every pod that should have reported did, with fresh data.
    pub complete: bool,
}

impl SampleMemory {
    fn of(s: &Sample, now: f64) -> Self {
        let three = |a: Averaged| [a.raw, a.smoothed, a.trend_base];
        Self {
            age: now - s.t,
            demand: three(s.demand),
            kv: three(s.kv),
            reserve: s.reserve,
            desired: s.desired,
            guarded: s.guarded,
            lean: s.lean,
            complete: s.complete,
        }
    }

    /// The sample as of `now`; an age under 0 (clocks that disagree) counts as now.
    fn sample(&self, now: f64) -> Sample {
        let averaged = |[raw, smoothed, trend_base]: [f64; 3]| Averaged {
            raw,
            smoothed,
            trend_base,
        };
        Sample {
            t: now - self.age.max(0.0),
            demand: averaged(self.demand),
            kv: averaged(self.kv),
            reserve: self.reserve,
            desired: self.desired,
            guarded: self.guarded,
            lean: self.lean,
            complete: self.complete,
        }
    }
}

/// Times are ages in seconds before the `now` the memory was taken at: the successor's clock
/// is its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyMemory {
    pub last_up_age: Option<f64>,
    pub last_down_age: Option<f64>,
    /// The last scale-down that reversed a scale-up.
    pub last_down_reversal_age: Option<f64>,
    /// The last decision that saw a pod still starting.
    pub last_starting_age: Option<f64>,
    /// The scale-down window in force (doubled after reversals).
    pub scale_down_window_seconds: f64,
    /// Pods being drained, with how long.
    pub draining: Vec<(String, f64)>,
    pub budget: BudgetMemory,
    /// The demand history, oldest first: only in a stopping leader's [`Policy::handover`].
    pub history: Vec<SampleMemory>,
}

impl Policy {
    /// What a successor needs to go on from `now` (see the module).
    pub fn memory(&self, now: f64) -> PolicyMemory {
        let age = |t: Option<f64>| t.map(|t| now - t);
        PolicyMemory {
            last_up_age: age(self.last_up),
            last_down_age: age(self.last_down),
            last_down_reversal_age: age(self.last_down_reversal),
            last_starting_age: age(self.last_starting),
            scale_down_window_seconds: self.hold,
            draining: self
                .draining
                .iter()
                .map(|d| (d.pod.clone(), now - d.since))
                .collect(),
            budget: self.budget.memory(now),
            history: Vec::new(),
        }
    }

    /// What a stopping leader hands its successor: the memory and the demand history, so
    /// that the successor decides from `now` on as this policy would have (see the module).
    pub fn handover(&self, now: f64) -> PolicyMemory {
        PolicyMemory {
            history: self
                .history
                .iter()
                .map(|s| SampleMemory::of(s, now))
                .collect(),
            ..self.memory(now)
        }
    }

    /// A policy under `cfg` that goes on from `m`, taken by its predecessor, at `now` on this
    /// policy's clock. Ages under 0 (the two clocks disagree) count as now, the side that
    /// holds back.
    pub fn restore(cfg: PolicyConfig, m: &PolicyMemory, now: f64) -> Self {
        let at = |age: Option<f64>| age.map(|a| now - a.max(0.0));
        let base = cfg.scale_down_window_seconds;
        let mut p = Self::new(cfg);
        p.last_up = at(m.last_up_age);
        p.last_down = at(m.last_down_age);
        p.last_down_reversal = at(m.last_down_reversal_age);
        p.last_starting = at(m.last_starting_age);
        p.hold = if m.scale_down_window_seconds.is_finite() {
            m.scale_down_window_seconds
                .clamp(base, base * MAX_HOLD_FACTOR)
        } else {
            base
        };
        p.draining = m
            .draining
            .iter()
            .map(|(pod, age)| Draining {
                pod: pod.clone(),
                since: now - age.max(0.0),
            })
            .collect();
        // The budget under the configuration `Self::new` gave it.
        p.budget = ErrorBudget::restore(p.budget.config(), &m.budget, now);
        p.history = restore_history(&m.history, now);
        p
    }
}

/// The samples of `history` as of `now`, oldest first. A history out of order (an edited
/// status) is not history: it is dropped, and the successor starts afresh as after a lost
/// leader.
fn restore_history(history: &[SampleMemory], now: f64) -> VecDeque<Sample> {
    let ordered = history.iter().all(|s| s.age.is_finite())
        && history.windows(2).all(|w| w[0].age >= w[1].age);
    if !ordered {
        return VecDeque::new();
    }
    history.iter().map(|s| s.sample(now)).collect()
}
