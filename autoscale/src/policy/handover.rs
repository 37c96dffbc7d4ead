//! What a policy hands to its successor: a new leader after a failover or a rolling update
//! of the operator goes on with the windows, the drains and the error budget of the old one,
//! instead of forgetting the budget it overspent (and sizing lean through the rest of a burst)
//! or the reversal it just made (and making another).
//!
//! The demand history is not handed over: a successor drains nothing until it has seen a
//! whole scale-down window of fresh data itself, as after any start. So nothing handed over
//! lets it scale down sooner than a new policy would (it only finishes the old one's drains);
//! the windows, the reversals and the budget only hold it back, or make it keep a margin.

use super::{Draining, Policy, PolicyConfig, MAX_HOLD_FACTOR};
use crate::budget::{BudgetMemory, ErrorBudget};

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
        p
    }
}
