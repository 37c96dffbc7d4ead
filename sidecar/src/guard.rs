//! The fast guard: AIMD on the engine's admission limits, inside the operator's bounds.
//!
//! Lowering a limit never evicts a running sequence (the engine only stops admitting), so a
//! decrease is taken from what is actually running, not from the configured limit: halving a
//! limit of 64 while 5 sequences run would change nothing. Decreases are spaced by a cooldown
//! (their effect shows only as sequences finish); increases are additive, one step per
//! interval, and only once the level is back to ok and no decrease happened for a while.
//!
//! A forecast of the redline holds admission at what runs; only the redline itself or a
//! preemption halves. The engine keeps every admission under the redline (`max_kv_usage`), so
//! what a forecast still warns of is the running sequences' own growth, which no cut touches:
//! holding admission is all a cut can do about it. Halving on a forecast too kept the engine
//! from admitting for seconds after the danger passed (the simulator's small-pool test: 97.05%
//! TTFT attainment against 98.79% holding, both without a preemption). A pool at the redline,
//! or a preemption, says the running set itself outgrew its share: halving keeps the guard from
//! readmitting into the same squeeze as soon as one sequence finishes.
//! Pure: the sidecar's loop feeds it and applies what it returns.

use redline_api::{Derived, GuardSettings, Level, Limits};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// Multiplicative decrease factor.
    pub decrease_factor: f64,
    pub decrease_cooldown_seconds: f64,
    /// Additive increase per step: this fraction of the target, for sequences and for the
    /// token budget alike, and at least `increase_seqs` sequences. A fixed step of one
    /// sequence would take vLLM's 256-sequence default four minutes to come back from a hold.
    pub increase_seqs: u32,
    pub increase_fraction: f64,
    pub increase_interval_seconds: f64,
    /// No increase until this long after the last decrease.
    pub calm_before_increase_seconds: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            decrease_factor: 0.5,
            decrease_cooldown_seconds: 1.0,
            increase_seqs: 1,
            increase_fraction: 0.125,
            increase_interval_seconds: 1.0,
            calm_before_increase_seconds: 3.0,
        }
    }
}

/// The range the guard moves in: the operator's target is the top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: Limits,
    pub target: Limits,
}

impl Bounds {
    /// `min` is capped by `target` (a target of 0 sequences drains, whatever the minimum); the
    /// token budget is at least 1 (the engine refuses 0).
    pub fn new(min: Limits, target: Limits) -> Self {
        let target = Limits {
            max_num_seqs: target.max_num_seqs,
            max_batched_tokens: target.max_batched_tokens.max(1),
        };
        Self {
            min: Limits {
                max_num_seqs: min.max_num_seqs.min(target.max_num_seqs),
                max_batched_tokens: min.max_batched_tokens.clamp(1, target.max_batched_tokens),
            },
            target,
        }
    }

    pub fn clamp(&self, l: Limits) -> Limits {
        Limits {
            max_num_seqs: l
                .max_num_seqs
                .clamp(self.min.max_num_seqs, self.target.max_num_seqs),
            max_batched_tokens: l
                .max_batched_tokens
                .clamp(self.min.max_batched_tokens, self.target.max_batched_tokens),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// KV usage predicted to reach the redline within the horizon.
    Forecast {
        seconds: f64,
    },
    Preemptions {
        per_second: f64,
    },
    AtRedline {
        usage: f64,
    },
    /// Elevated pressure: no admission beyond the sequences already running.
    Hold,
    /// Pressure receded and requests wait on the limit: one additive step back up.
    Recovered,
    /// The operator changed the bounds (or turned the guard off): follow them.
    Bounds,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Forecast { seconds } => write!(f, "KV redline forecast in {seconds:.1}s"),
            Reason::Preemptions { per_second } => write!(f, "{per_second:.2} preemptions/s"),
            Reason::AtRedline { usage } => {
                write!(f, "KV usage {:.0}% at the redline", usage * 100.0)
            }
            Reason::Hold => write!(f, "elevated KV pressure: holding admission"),
            Reason::Recovered => write!(f, "pressure receded"),
            Reason::Bounds => write!(f, "operator bounds"),
        }
    }
}

impl Reason {
    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::Forecast { .. } => "forecast",
            Reason::Preemptions { .. } => "preemptions",
            Reason::AtRedline { .. } => "redline",
            Reason::Hold => "hold",
            Reason::Recovered => "recovered",
            Reason::Bounds => "bounds",
        }
    }
    pub fn is_decrease(&self) -> bool {
        matches!(
            self,
            Reason::Forecast { .. }
                | Reason::Preemptions { .. }
                | Reason::AtRedline { .. }
                | Reason::Hold
        )
    }
}

/// The share of the KV pool the engine may fill by admission beside running requests
/// (`redline_api::admission`): the redline while the guard runs. The guard sees the pool
/// once a scrape; the engine checks every admission, so no prompt admitted between two
/// scrapes carries the pool past the line. Without the guard, the watermark alone.
pub fn max_kv_usage(settings: &GuardSettings) -> f64 {
    if settings.enabled {
        settings.redline_ratio
    } else {
        1.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub limits: Limits,
    pub reason: Reason,
}

/// What the guard needs to know about the engine right now.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub derived: &'a Derived,
    pub kv_usage: f64,
    pub running: u64,
}

#[derive(Debug, Clone)]
pub struct Guard {
    cfg: GuardConfig,
    /// The limits the guard holds the engine at.
    current: Limits,
    last_decrease: f64,
    last_increase: f64,
}

impl Guard {
    pub fn new(cfg: GuardConfig, start: Limits) -> Self {
        Self {
            cfg,
            current: start,
            last_decrease: f64::NEG_INFINITY,
            last_increase: f64::NEG_INFINITY,
        }
    }

    pub fn current(&self) -> Limits {
        self.current
    }

    /// What the engine actually accepted (it clamps to its capacity envelope).
    pub fn sync(&mut self, accepted: Limits) {
        self.current = accepted;
    }

    /// One decision at `now` (seconds). `Some` when the engine's limits should change.
    pub fn step(
        &mut self,
        now: f64,
        obs: Observation<'_>,
        bounds: Bounds,
        settings: &GuardSettings,
    ) -> Option<Change> {
        let change = self.decide(now, obs, bounds, settings)?;
        if change.reason.is_decrease() {
            self.last_decrease = now;
        } else if change.reason == Reason::Recovered {
            self.last_increase = now;
        }
        self.current = change.limits;
        Some(change)
    }

    fn decide(
        &self,
        now: f64,
        obs: Observation<'_>,
        bounds: Bounds,
        settings: &GuardSettings,
    ) -> Option<Change> {
        let cur = self.current;
        let set =
            |limits: Limits, reason: Reason| (limits != cur).then_some(Change { limits, reason });
        if !settings.enabled {
            return set(bounds.target, Reason::Bounds);
        }
        let clamped = bounds.clamp(cur);
        if clamped != cur {
            return set(clamped, Reason::Bounds);
        }
        let d = obs.derived;
        let running = u32::try_from(obs.running).unwrap_or(u32::MAX);
        let cooled = now - self.last_decrease >= self.cfg.decrease_cooldown_seconds;
        let halve = if d.preemptions_per_second > 0.0 {
            Some(Reason::Preemptions {
                per_second: d.preemptions_per_second,
            })
        } else if obs.kv_usage >= settings.redline_ratio {
            Some(Reason::AtRedline {
                usage: obs.kv_usage,
            })
        } else {
            None
        };
        if let Some(reason) = halve {
            if !cooled {
                return None;
            }
            let f = self.cfg.decrease_factor;
            let effective = cur.max_num_seqs.min(running.max(1));
            let want = Limits {
                max_num_seqs: (effective as f64 * f).floor() as u32,
                max_batched_tokens: (cur.max_batched_tokens as f64 * f).floor() as u32,
            };
            return set(bounds.clamp(want), reason);
        }
        let hold = if let Some(seconds) = d
            .seconds_to_redline
            .filter(|s| *s < settings.horizon_seconds)
        {
            Some(Reason::Forecast { seconds })
        } else {
            // Elevated: a limit above the running count is headroom the next burst of prompts
            // would take all at once.
            (d.level >= Level::Elevated).then_some(Reason::Hold)
        };
        // Admit nobody beyond who runs now.
        if let Some(reason) = hold {
            if cooled && cur.max_num_seqs > running {
                let want = Limits {
                    max_num_seqs: running,
                    ..cur
                };
                return set(bounds.clamp(want), reason);
            }
            return None;
        }
        // Back up one additive step per interval once calm, whether or not requests wait: a
        // limit left low after a burst would throttle the next one from its first request,
        // and the forecast catches that burst anyway.
        let calm = now - self.last_decrease >= self.cfg.calm_before_increase_seconds
            && now - self.last_increase >= self.cfg.increase_interval_seconds;
        if calm && cur != bounds.target {
            let share = |of: u32| (of as f64 * self.cfg.increase_fraction).ceil() as u32;
            let want = Limits {
                max_num_seqs: cur
                    .max_num_seqs
                    .saturating_add(share(bounds.target.max_num_seqs).max(self.cfg.increase_seqs)),
                max_batched_tokens: cur
                    .max_batched_tokens
                    .saturating_add(share(bounds.target.max_batched_tokens).max(1)),
            };
            return set(bounds.clamp(want), Reason::Recovered);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn derived(level: Level, ttr: Option<f64>, preempt: f64) -> Derived {
        Derived {
            seconds_to_redline: ttr,
            preemptions_per_second: preempt,
            level,
            ..Default::default()
        }
    }

    fn bounds() -> Bounds {
        Bounds::new(Limits::new(1, 64), Limits::new(32, 512))
    }

    #[test]
    fn a_forecast_holds_what_runs_and_the_redline_or_a_preemption_halves_it() {
        let s = GuardSettings::default();
        let mut g = Guard::new(GuardConfig::default(), Limits::new(32, 512));
        let forecast = derived(Level::Critical, Some(2.0), 0.0);
        let obs = |d, kv_usage, running| Observation {
            derived: d,
            kv_usage,
            running,
        };
        let c = g.step(10.0, obs(&forecast, 0.5, 6), bounds(), &s).unwrap();
        assert_eq!(c.limits, Limits::new(6, 512));
        assert!(matches!(c.reason, Reason::Forecast { .. }));
        // Held already: nothing more to do while it runs 6, and fewer once some finish.
        assert_eq!(g.step(11.0, obs(&forecast, 0.5, 6), bounds(), &s), None);
        // At the redline, what runs is halved; cooldown: no second cut within a second.
        let at_line = derived(Level::Critical, None, 0.0);
        let c = g.step(12.0, obs(&at_line, 0.9, 4), bounds(), &s).unwrap();
        assert_eq!(c.limits, Limits::new(2, 256));
        assert!(matches!(c.reason, Reason::AtRedline { .. }));
        let hot = derived(Level::Critical, None, 0.5);
        assert_eq!(g.step(12.5, obs(&hot, 0.8, 4), bounds(), &s), None);
        // A preemption halves too.
        let c = g.step(13.0, obs(&hot, 0.8, 4), bounds(), &s).unwrap();
        assert_eq!(c.limits, Limits::new(1, 128));
        assert!(matches!(c.reason, Reason::Preemptions { .. }));
    }

    #[test]
    fn recovery_is_additive_one_step_per_interval_after_a_calm_period() {
        let mut g = Guard::new(GuardConfig::default(), Limits::new(32, 512));
        let hot = derived(Level::Critical, None, 1.0);
        let obs = |d, running| Observation {
            derived: d,
            kv_usage: 0.5,
            running,
        };
        let s = GuardSettings::default();
        g.step(0.0, obs(&hot, 4), bounds(), &s).unwrap();
        assert_eq!(g.current(), Limits::new(2, 256));
        let ok = derived(Level::Ok, None, 0.0);
        assert_eq!(g.step(2.0, obs(&ok, 2), bounds(), &s), None, "not calm yet");
        // Whether or not anybody waits: the next burst should not start throttled.
        let c = g.step(3.0, obs(&ok, 0), bounds(), &s).unwrap();
        // An eighth of the target (32 sequences, 512 tokens) per step.
        assert_eq!(
            (c.limits, c.reason),
            (Limits::new(6, 320), Reason::Recovered)
        );
        assert_eq!(
            g.step(3.5, obs(&ok, 3), bounds(), &s),
            None,
            "one step per interval"
        );
        let elevated = derived(Level::Elevated, Some(12.0), 0.0);
        assert_eq!(g.step(5.0, obs(&elevated, 6), bounds(), &s), None);
    }

    #[test]
    fn a_large_target_comes_back_from_a_hold_in_eight_steps() {
        // vLLM's default of 256 sequences, held at the one running.
        let target = Limits::new(256, 2048);
        let b = Bounds::new(Limits::new(1, 16), target);
        let mut g = Guard::new(GuardConfig::default(), target);
        let s = GuardSettings::default();
        let elevated = derived(Level::Elevated, Some(12.0), 0.0);
        let obs = |d, running| Observation {
            derived: d,
            kv_usage: 0.3,
            running,
        };
        g.step(0.0, obs(&elevated, 1), b, &s).unwrap();
        assert_eq!(g.current(), Limits::new(1, 2048));
        let ok = derived(Level::Ok, None, 0.0);
        let steps = (3..60)
            .take_while(|t| {
                g.step(*t as f64, obs(&ok, 1), b, &s);
                g.current() != target
            })
            .count()
            + 1;
        assert_eq!(steps, 8, "{:?}", g.current());
    }

    #[test]
    fn elevated_pressure_holds_admission_at_what_runs() {
        let mut g = Guard::new(GuardConfig::default(), Limits::new(32, 512));
        let elevated = derived(Level::Elevated, Some(12.0), 0.0);
        let obs = Observation {
            derived: &elevated,
            kv_usage: 0.75,
            running: 5,
        };
        let c = g
            .step(0.0, obs, bounds(), &GuardSettings::default())
            .unwrap();
        assert_eq!((c.limits, c.reason), (Limits::new(5, 512), Reason::Hold));
        assert_eq!(g.step(2.0, obs, bounds(), &GuardSettings::default()), None);
    }

    #[test]
    fn drain_and_disable_follow_the_operator() {
        let mut g = Guard::new(GuardConfig::default(), Limits::new(8, 256));
        let d = derived(Level::Ok, None, 0.0);
        let obs = Observation {
            derived: &d,
            kv_usage: 0.1,
            running: 0,
        };
        let drain = Bounds::new(Limits::new(1, 64), Limits::new(0, 256));
        let c = g.step(0.0, obs, drain, &GuardSettings::default()).unwrap();
        assert_eq!(c.limits.max_num_seqs, 0);
        let off = GuardSettings {
            enabled: false,
            ..Default::default()
        };
        let c = g.step(1.0, obs, bounds(), &off).unwrap();
        assert_eq!((c.limits, c.reason), (Limits::new(32, 512), Reason::Bounds));
    }

    proptest! {
        /// Whatever happens, the guard's limits stay inside the operator's bounds, a decrease
        /// never raises anything, and an increase never lowers anything.
        #[test]
        fn limits_stay_in_bounds_and_move_the_right_way(
            steps in proptest::collection::vec(
                (0u8..3, proptest::option::of(0.0f64..20.0), 0.0f64..2.0, 0u64..40, 0.0f64..1.0, 0u32..40, 0u32..1024, 0u32..8, 0u32..128),
                1..80,
            ),
        ) {
            let mut g = Guard::new(GuardConfig::default(), Limits::new(16, 256));
            let settings = GuardSettings::default();
            for (i, (lv, ttr, pre, running, usage, tseqs, ttok, mseqs, mtok)) in steps.into_iter().enumerate() {
                let level = [Level::Ok, Level::Elevated, Level::Critical][lv as usize];
                let d = derived(level, ttr, if pre > 1.5 { pre } else { 0.0 });
                let b = Bounds::new(Limits::new(mseqs, mtok), Limits::new(tseqs, ttok));
                let before = g.current();
                let obs = Observation { derived: &d, kv_usage: usage, running };
                if let Some(c) = g.step(i as f64 * 0.25, obs, b, &settings) {
                    prop_assert_eq!(c.limits, b.clamp(c.limits));
                    if c.reason.is_decrease() {
                        prop_assert!(c.limits.max_num_seqs <= before.max_num_seqs);
                        prop_assert!(c.limits.max_batched_tokens <= before.max_batched_tokens);
                    }
                    if c.reason == Reason::Recovered {
                        prop_assert!(c.limits.max_num_seqs >= before.max_num_seqs);
                        prop_assert!(c.limits.max_batched_tokens >= before.max_batched_tokens);
                    }
                }
                prop_assert_eq!(g.current(), b.clamp(g.current()));
            }
        }
    }
}
