//! The pressure model: from a stream of readings to headroom, growth, a time-to-redline
//! forecast and a level. Pure (time is an argument), so it is proptested here and reused as is
//! by the simulator.
//!
//! The forecast extrapolates the growth the running sequences make on their own: the tokens
//! they generate, one per sequence per step, over the pool's size in tokens, less the blocks
//! completions give back (where the engine counts them: in a steady state they balance, and
//! decoding alone forecast a redline that never came). What the KV usage does besides is
//! admissions (a prompt's blocks, taken at once when it is prefilled: a step, not a trend, and
//! what the guard itself controls). A slope of
//! the usage mixes the three: on long prompts a few prefills within its window look like a
//! climb to the redline within seconds, and a guard that believed it held admission at a third
//! of the pool (docs/autoscaling.md, "A second workload: conversations"). Admissions come back
//! in two ways: a queue whose prompts could carry the pool to the redline on their own is a
//! trend (the usage's slope joins the forecast), and the level is elevated when two steps'
//! token budgets would reach the redline (a cut lands only for the step after the one under
//! way). The usage's slope (least squares over a sliding window) is still reported, and is the
//! forecast for engines that do not say how large their pool is in tokens.
//!
//! The level goes up at once and comes down only after the pressure has stayed under the lower
//! (exit) thresholds for `calm_seconds`: a pod hovering at a threshold does not flap between
//! levels.

use std::collections::VecDeque;

use redline_api::{Derived, DeviceReading, EngineReading, GuardSettings, Level};

use crate::arrivals::ArrivalCurve;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    /// Seconds of samples the growth slope and the decode rate are measured over.
    pub window_seconds: f64,
    /// Seconds token rates are averaged over: at least the operator's decision interval, so
    /// every arrival between two decisions is seen.
    pub rate_window_seconds: f64,
    /// How far under the redline KV usage becomes elevated, and how far under it must fall to
    /// return to ok (ratios of the pool). Small: the forecast is the reserve that the running
    /// sequences' growth needs, and a wide fixed band held admission while the pool had room.
    pub elevated_margin: f64,
    pub elevated_exit_margin: f64,
    /// How far under the redline (as a ratio of the pool) usage must fall to leave critical.
    pub critical_exit_margin: f64,
    /// Forecast horizons are widened by this factor to leave a level (hysteresis on time).
    pub horizon_exit_factor: f64,
    pub calm_seconds: f64,
    /// How long the arrival curve remembers a burst: at least the operator's decision
    /// interval, so every burst is in some report it reads.
    pub arrival_memory_seconds: f64,
    /// Seconds the mean inter-token latency is measured over: the engine's load, past a burst.
    pub load_window_seconds: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            window_seconds: 3.0,
            rate_window_seconds: 10.0,
            elevated_margin: 0.05,
            elevated_exit_margin: 0.1,
            critical_exit_margin: 0.1,
            horizon_exit_factor: 1.5,
            calm_seconds: 2.0,
            arrival_memory_seconds: 10.0,
            load_window_seconds: 60.0,
        }
    }
}

pub use redline_api::slope;

/// Seconds until `value` growing at `rate` per second reaches `limit`; `Some(0)` at or past it,
/// `None` when it is not rising (noise-level slopes count as not rising).
pub fn seconds_until(value: f64, rate: f64, limit: f64) -> Option<f64> {
    if value >= limit {
        return Some(0.0);
    }
    (rate > 1e-4).then(|| (limit - value) / rate)
}

/// What the level is judged on.
#[derive(Debug, Clone, Copy)]
struct Pressure {
    usage: f64,
    /// The share of the pool the next admission takes at once (see [`next_admission`]).
    next_admission: f64,
    seconds_to_redline: Option<f64>,
    preempting: bool,
}

/// The share of the pool the engine can admit before a cut reaches it: the step under way
/// was scheduled under the old limits, and the guard's cut lands for the next one, so two
/// steps' token budgets. The forecast leaves admissions out (a step, not a trend), so the
/// level looks this far ahead instead. A fifth of the pool on a small CPU engine's, half a
/// percent on a GPU's; 0 when the engine does not say.
fn next_admission(e: &EngineReading, pool: Option<f64>) -> f64 {
    match (e.limits, pool) {
        (Some(l), Some(pool)) => 2.0 * l.max_batched_tokens as f64 / pool,
        _ => 0.0,
    }
}

/// The KV pool's size in tokens, when the engine says.
fn pool_tokens(e: &EngineReading) -> Option<f64> {
    let tokens = e.kv_blocks_total? * e.kv_block_size?;
    (tokens > 0).then_some(tokens as f64)
}

/// A monotonic counter's samples over the window, for its rate.
#[derive(Debug, Clone, Default)]
struct Counter {
    samples: VecDeque<(f64, f64)>,
}

impl Counter {
    /// The rate over the last `window` seconds; `None` when the engine does not export the
    /// counter or there is only one sample. A counter that went down (an engine restart) starts
    /// the window afresh.
    fn rate(&mut self, now: f64, window: f64, value: Option<u64>) -> Option<f64> {
        self.rate_of(now, window, value.map(|v| v as f64))
    }

    /// [`Counter::rate`] of a counter that is not whole (a histogram's sum of seconds).
    fn rate_of(&mut self, now: f64, window: f64, value: Option<f64>) -> Option<f64> {
        let Some(v) = value else {
            self.samples.clear();
            return None;
        };
        if self.samples.back().is_some_and(|&(_, c)| c > v) {
            self.samples.clear();
        }
        self.samples.push_back((now, v));
        while self.samples.front().is_some_and(|(t, _)| now - t > window) {
            self.samples.pop_front();
        }
        self.recent_rate(now, window)
    }

    /// The rate over the last `window` seconds of the samples kept (at most the window the
    /// last [`Counter::rate`] kept): a shorter view of the same counter.
    fn recent_rate(&self, now: f64, window: f64) -> Option<f64> {
        let mut recent = self.samples.iter().filter(|(t, _)| now - t <= window);
        match (recent.next(), self.samples.back()) {
            (Some(&(t0, c0)), Some(&(t1, c1))) if t1 > t0 => Some((c1 - c0) / (t1 - t0)),
            _ => None,
        }
    }
}

/// The sliding windows and the level with its hysteresis state.
#[derive(Debug, Clone)]
pub struct PressureModel {
    cfg: ModelConfig,
    kv: VecDeque<(f64, f64)>,
    device: VecDeque<(f64, f64)>,
    preemptions: Counter,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    freed_blocks: Counter,
    late_requests: Counter,
    first_tokens: Counter,
    /// The inter-token latency histogram's sum and count: their rates' ratio is its mean.
    inter_token_seconds: Counter,
    inter_tokens: Counter,
    /// The step histogram's sum and count.
    step_seconds: Counter,
    steps: Counter,
    arrivals: ArrivalCurve,
    level: Level,
    /// Since when the pressure has been below the current level's exit thresholds.
    calm_since: Option<f64>,
}

impl PressureModel {
    pub fn new(cfg: ModelConfig) -> Self {
        Self {
            cfg,
            kv: VecDeque::new(),
            device: VecDeque::new(),
            preemptions: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            freed_blocks: Counter::default(),
            late_requests: Counter::default(),
            first_tokens: Counter::default(),
            inter_token_seconds: Counter::default(),
            inter_tokens: Counter::default(),
            step_seconds: Counter::default(),
            steps: Counter::default(),
            arrivals: ArrivalCurve::new(cfg.arrival_memory_seconds),
            level: Level::Ok,
            calm_since: None,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// Feeds one scrape taken at `now` (seconds, monotonic) and returns what it implies, against
    /// the guard's current horizon and redline (the operator may change them at any time).
    pub fn observe(
        &mut self,
        now: f64,
        engine: &EngineReading,
        device: &DeviceReading,
        guard: &GuardSettings,
    ) -> Derived {
        let horizon = self.cfg.window_seconds;
        let keep = |q: &mut VecDeque<(f64, f64)>| {
            while q.front().is_some_and(|(t, _)| now - t > horizon) {
                q.pop_front();
            }
        };
        let usage = engine.kv_usage_ratio.clamp(0.0, 1.0);
        self.kv.push_back((now, usage));
        keep(&mut self.kv);

        let device_ratio = match (device.memory_used_bytes, device.memory_total_bytes) {
            (Some(u), Some(t)) if t > 0 => Some((u as f64 / t as f64).clamp(0.0, 1.0)),
            _ => None,
        };
        if let Some(r) = device_ratio {
            self.device.push_back((now, r));
        }
        keep(&mut self.device);

        let growth = slope(self.kv.iter().copied()).unwrap_or(0.0);
        let generation_tokens_per_second = self.generation_tokens.rate(
            now,
            self.cfg.rate_window_seconds,
            engine.generation_tokens_total,
        );
        let pool = pool_tokens(engine);
        // Completions free what running sequences had grown: the forecast is the growth net
        // of them. Of the rate window's release and the short window's, the smaller: a lull
        // in completions (only long sequences left running) shows at once, and one lumpy
        // completion does not read as a lasting release.
        let long_release = self.freed_blocks.rate(
            now,
            self.cfg.rate_window_seconds,
            engine.kv_blocks_freed_total,
        );
        let release = long_release
            .map(|r| r.min(self.freed_blocks.recent_rate(now, horizon).unwrap_or(0.0)))
            .zip(engine.kv_blocks_total.filter(|&t| t > 0))
            .map(|(blocks_per_second, total)| blocks_per_second / total as f64);
        let decode_growth = self
            .generation_tokens
            .recent_rate(now, horizon)
            .zip(pool)
            .map(|(tokens_per_second, pool)| tokens_per_second / pool - release.unwrap_or(0.0));
        // Admissions fed by a queue that could carry the pool to the redline on its own go on
        // until it does: then they are a trend too.
        let queue = match (engine.waiting_prompt_tokens, pool) {
            (Some(t), Some(pool)) => t as f64 / pool,
            _ => 0.0,
        };
        let forecast_growth = match decode_growth {
            Some(d) if usage + queue < guard.redline_ratio => d,
            Some(d) => d.max(growth),
            None => growth,
        };
        let seconds_to_redline = seconds_until(usage, forecast_growth, guard.redline_ratio);
        let device_seconds_to_full = device_ratio.and_then(|r| {
            slope(self.device.iter().copied()).and_then(|s| seconds_until(r, s, 1.0))
        });
        let preemptions_per_second = self
            .preemptions
            .rate(now, horizon, Some(engine.preemptions_total))
            .unwrap_or(0.0);
        let prompt_tokens_per_second = self.prompt_tokens.rate(
            now,
            self.cfg.rate_window_seconds,
            engine.prompt_tokens_received_total,
        );
        let late_requests_per_second = self.late_requests.rate(
            now,
            self.cfg.rate_window_seconds,
            engine.requests_late_total,
        );
        let first_tokens_per_second =
            self.first_tokens
                .rate(now, self.cfg.rate_window_seconds, engine.first_tokens_total);
        let load_window = self.cfg.load_window_seconds;
        let mean_inter_token_latency_seconds = match (
            self.inter_token_seconds
                .rate_of(now, load_window, engine.inter_token_seconds_total),
            self.inter_tokens
                .rate(now, load_window, engine.inter_tokens_total),
        ) {
            (Some(seconds), Some(tokens)) if tokens > 0.0 => Some(seconds / tokens),
            _ => None,
        };
        let busy_share = self
            .step_seconds
            .rate_of(now, load_window, engine.step_seconds_total);
        let steps_per_second = self.steps.rate(now, load_window, engine.steps_total);
        let prompt_arrival_peaks = self
            .arrivals
            .observe(now, engine.prompt_tokens_received_total);
        let headroom_ratio = (1.0 - usage).min(device_ratio.map_or(1.0, |r| 1.0 - r));
        let pressure = Pressure {
            usage,
            next_admission: next_admission(engine, pool),
            seconds_to_redline,
            preempting: preemptions_per_second > 0.0,
        };
        let level = self.next_level(now, guard, pressure);
        Derived {
            headroom_ratio,
            kv_growth_per_second: growth,
            kv_decode_growth_per_second: decode_growth,
            kv_release_per_second: release,
            seconds_to_redline,
            device_seconds_to_full,
            preemptions_per_second,
            level,
            prompt_tokens_per_second,
            generation_tokens_per_second,
            late_requests_per_second,
            first_tokens_per_second,
            mean_inter_token_latency_seconds,
            busy_share,
            steps_per_second,
            prompt_arrival_peaks,
        }
    }

    /// The level the pressure calls for: `exit` applies the wider (leaving) thresholds.
    fn classify(&self, g: &GuardSettings, p: Pressure, exit: bool) -> Level {
        let c = &self.cfg;
        let (h, redline, elevated) = if exit {
            (
                g.horizon_seconds * c.horizon_exit_factor,
                g.redline_ratio - c.critical_exit_margin,
                g.redline_ratio - c.elevated_exit_margin,
            )
        } else {
            (
                g.horizon_seconds,
                g.redline_ratio,
                g.redline_ratio - c.elevated_margin,
            )
        };
        let within = |secs: f64| p.seconds_to_redline.is_some_and(|t| t < secs);
        if p.preempting || p.usage >= redline || within(h) {
            Level::Critical
        } else if p.usage >= elevated || p.usage + p.next_admission >= redline || within(3.0 * h) {
            Level::Elevated
        } else {
            Level::Ok
        }
    }

    fn next_level(&mut self, now: f64, g: &GuardSettings, p: Pressure) -> Level {
        let enter = self.classify(g, p, false);
        if enter >= self.level {
            if enter > self.level {
                self.level = enter;
            }
            self.calm_since = None;
            return self.level;
        }
        let exit = self.classify(g, p, true);
        if exit >= self.level {
            self.calm_since = None;
            return self.level;
        }
        let since = *self.calm_since.get_or_insert(now);
        if now - since >= self.cfg.calm_seconds {
            self.level = exit;
            self.calm_since = None;
        }
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use redline_api::EngineFlavor;

    fn engine(usage: f64, preemptions: u64) -> EngineReading {
        EngineReading {
            kv_blocks_total: Some(100),
            kv_blocks_used: Some((usage * 100.0) as u64),
            requests_running: 1,
            preemptions_total: preemptions,
            ..EngineReading::new(EngineFlavor::Redline, usage)
        }
    }

    fn none() -> DeviceReading {
        DeviceReading {
            backend: "none".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_steady_climb_is_forecast_and_goes_critical_inside_the_horizon() {
        let mut m = PressureModel::new(ModelConfig::default());
        let mut d = Derived::default();
        // 5% of the pool per second from 10%.
        for i in 0..=10 {
            let t = i as f64 * 0.25;
            d = m.observe(
                t,
                &engine(0.10 + 0.05 * t, 0),
                &none(),
                &GuardSettings::default(),
            );
        }
        assert!((d.kv_growth_per_second - 0.05).abs() < 1e-9);
        let ttr = d.seconds_to_redline.unwrap();
        // At t=2.5 usage is 0.225: (0.9 - 0.225) / 0.05 = 13.5 s.
        assert!((ttr - 13.5).abs() < 1e-6, "{ttr}");
        assert_eq!(
            d.level,
            Level::Elevated,
            "13.5 s is inside 3x the 5 s horizon"
        );
        for i in 11..=60 {
            let t = i as f64 * 0.25;
            d = m.observe(
                t,
                &engine(0.10 + 0.05 * t, 0),
                &none(),
                &GuardSettings::default(),
            );
        }
        assert_eq!(d.level, Level::Critical);
    }

    /// Long prompts admitted one after another: the usage climbs 15% of the pool per second
    /// for two seconds while the running sequences generate 16 tokens/s (1% of a 1,600-token
    /// pool). The decode growth is the forecast; an engine that does not say its block size
    /// gets the slope's, which calls the admissions a climb to the redline.
    #[test]
    fn prefills_are_steps_and_decoding_is_the_trend() {
        let run = |block_size: Option<u64>| {
            let mut m = PressureModel::new(ModelConfig::default());
            let mut d = Derived::default();
            for i in 0..=8 {
                let t = i as f64 * 0.25;
                let e = EngineReading {
                    kv_block_size: block_size,
                    generation_tokens_total: Some((16.0 * t) as u64),
                    ..engine(0.10 + 0.15 * t, 0)
                };
                d = m.observe(t, &e, &none(), &GuardSettings::default());
            }
            d
        };
        let d = run(Some(16));
        assert!((d.kv_growth_per_second - 0.15).abs() < 1e-9);
        assert_eq!(d.kv_decode_growth_per_second, Some(0.01));
        // At t = 2 usage is 0.4: (0.9 - 0.4) / 0.01 = 50 s.
        let ttr = d.seconds_to_redline.unwrap();
        assert!((ttr - 50.0).abs() < 1e-6, "{ttr}");
        assert_eq!(d.level, Level::Ok);
        let d = run(None);
        assert_eq!(d.kv_decode_growth_per_second, None);
        let ttr = d.seconds_to_redline.unwrap();
        assert!((ttr - 0.5 / 0.15).abs() < 1e-6, "{ttr}");
        assert_eq!(d.level, Level::Critical);
    }

    /// Decoding at 2% of the pool per second while completions free 1.5%: the forecast is
    /// the net 0.5%. When completions stop, the short window shows it at once and the
    /// forecast is the whole decoding again, though the 10 s rate still remembers them.
    #[test]
    fn completions_free_what_decoding_grows() {
        // 100 blocks of 16 tokens: 2% of the pool is 32 tokens a second.
        let reading = |t: f64, freed: Option<f64>| EngineReading {
            kv_block_size: Some(16),
            generation_tokens_total: Some((32.0 * t) as u64),
            kv_blocks_freed_total: freed.map(|f| f as u64),
            ..engine(0.5, 0)
        };
        let mut m = PressureModel::new(ModelConfig::default());
        let mut d = Derived::default();
        let mut freed = 0.0;
        for i in 0..=56 {
            let t = i as f64 * 0.25;
            d = m.observe(
                t,
                &reading(t, Some(freed)),
                &none(),
                &GuardSettings::default(),
            );
            // Completions free 1.5% a second for 10 s, then stop.
            if i < 40 {
                freed += 1.5 * 0.25;
            }
            if i == 40 {
                let release = d.kv_release_per_second.unwrap();
                assert!((release - 0.015).abs() < 1e-3, "{release}");
                let net = d.kv_decode_growth_per_second.unwrap();
                assert!((net - 0.005).abs() < 1e-3, "{net}");
                // (0.9 - 0.5) / 0.005 = 80 s, not the 20 s decoding alone would say.
                let ttr = d.seconds_to_redline.unwrap();
                assert!((ttr - 0.4 / net).abs() < 1e-6, "{ttr}");
            }
        }
        assert_eq!(d.kv_release_per_second, Some(0.0));
        assert_eq!(d.kv_decode_growth_per_second, Some(0.02));
        // An engine that does not count freed blocks: decoding alone, as before.
        let d = m.observe(
            15.0,
            &reading(15.0, None),
            &none(),
            &GuardSettings::default(),
        );
        assert_eq!(d.kv_release_per_second, None);
        assert_eq!(d.kv_decode_growth_per_second, Some(0.02));
    }

    /// The same climb with requests waiting or a large token budget: a queue that could take
    /// the pool past the redline makes the slope the forecast again, and two steps' budgets
    /// that would reach it make the level elevated.
    #[test]
    fn admissions_count_when_a_queue_or_two_steps_could_reach_the_redline() {
        let run = |waiting_tokens: u64, budget: u32| {
            let mut m = PressureModel::new(ModelConfig::default());
            let mut d = Derived::default();
            for i in 0..=8 {
                let t = i as f64 * 0.25;
                let e = EngineReading {
                    kv_block_size: Some(16),
                    generation_tokens_total: Some((16.0 * t) as u64),
                    requests_waiting: u64::from(waiting_tokens > 0),
                    waiting_prompt_tokens: Some(waiting_tokens),
                    limits: Some(redline_api::Limits::new(8, budget)),
                    ..engine(0.10 + 0.15 * t, 0)
                };
                d = m.observe(t, &e, &none(), &GuardSettings::default());
            }
            d
        };
        // A 1,600-token pool at 0.4: 900 waiting tokens would take it past 0.9.
        let d = run(900, 16);
        let ttr = d.seconds_to_redline.unwrap();
        assert!((ttr - 0.5 / 0.15).abs() < 1e-6, "{ttr}");
        assert_eq!(d.level, Level::Critical);
        // 400 would not: decoding alone, and two 16-token steps are 2% of the pool.
        let d = run(400, 16);
        assert!((d.seconds_to_redline.unwrap() - 50.0).abs() < 1e-6);
        assert_eq!(d.level, Level::Ok);
        // Two steps of 480 tokens would take 60% of it.
        let d = run(0, 480);
        assert!((d.seconds_to_redline.unwrap() - 50.0).abs() < 1e-6);
        assert_eq!(d.level, Level::Elevated);
    }

    #[test]
    fn flat_usage_has_no_forecast_and_preemptions_are_critical() {
        let mut m = PressureModel::new(ModelConfig::default());
        let mut d = Derived::default();
        for i in 0..8 {
            d = m.observe(
                i as f64 * 0.25,
                &engine(0.3, 0),
                &none(),
                &GuardSettings::default(),
            );
        }
        assert_eq!(d.seconds_to_redline, None);
        assert_eq!(d.level, Level::Ok);
        d = m.observe(2.0, &engine(0.3, 2), &none(), &GuardSettings::default());
        assert!(d.preemptions_per_second > 0.0);
        assert_eq!(d.level, Level::Critical);
    }

    #[test]
    fn token_rates_come_from_the_counters_and_survive_an_engine_restart() {
        let mut m = PressureModel::new(ModelConfig::default());
        let g = GuardSettings::default();
        let at = |prompt: u64, gen: u64| EngineReading {
            prompt_tokens_received_total: Some(prompt),
            generation_tokens_total: Some(gen),
            requests_late_total: Some(gen / 50),
            first_tokens_total: Some(gen / 10),
            ..engine(0.1, 0)
        };
        assert_eq!(
            m.observe(0.0, &at(0, 0), &none(), &g)
                .prompt_tokens_per_second,
            None
        );
        m.observe(1.0, &at(1000, 50), &none(), &g);
        let d = m.observe(2.0, &at(3000, 100), &none(), &g);
        assert_eq!(d.prompt_tokens_per_second, Some(1500.0));
        assert_eq!(d.generation_tokens_per_second, Some(50.0));
        assert_eq!(d.late_requests_per_second, Some(1.0), "1 late request to 2");
        assert_eq!(d.first_tokens_per_second, Some(5.0));
        let d = m.observe(2.5, &at(10, 0), &none(), &g);
        assert_eq!(
            d.prompt_tokens_per_second, None,
            "restarted: one sample, no rate yet"
        );
        let d = m.observe(3.0, &engine(0.1, 0), &none(), &g);
        assert_eq!(
            (d.generation_tokens_per_second, d.late_requests_per_second),
            (None, None),
            "not exported: unknown, not zero"
        );
    }

    #[test]
    fn the_mean_inter_token_latency_is_the_windows_and_survives_an_engine_restart() {
        let cfg = ModelConfig {
            load_window_seconds: 10.0,
            ..ModelConfig::default()
        };
        let mut m = PressureModel::new(cfg);
        let g = GuardSettings::default();
        let at = |sum: f64, count: u64| EngineReading {
            inter_token_seconds_total: Some(sum),
            inter_tokens_total: Some(count),
            ..engine(0.1, 0)
        };
        let mean = |m: &mut PressureModel, t: f64, e: &EngineReading| {
            m.observe(t, e, &none(), &g)
                .mean_inter_token_latency_seconds
        };
        assert_eq!(mean(&mut m, 0.0, &at(0.0, 0)), None, "one sample");
        // 100 gaps of 10 ms, then 100 of 30 ms: the window holds both, then the second alone.
        assert_eq!(mean(&mut m, 5.0, &at(1.0, 100)), Some(0.01));
        let both = mean(&mut m, 10.0, &at(4.0, 200)).unwrap();
        assert!((both - 0.02).abs() < 1e-12, "{both}");
        let late = mean(&mut m, 15.0, &at(7.0, 300)).unwrap();
        assert!((late - 0.03).abs() < 1e-12, "{late}");
        assert_eq!(
            mean(&mut m, 16.0, &at(7.0, 300)),
            Some(0.03),
            "no new token"
        );
        assert_eq!(
            mean(&mut m, 26.0, &at(7.0, 300)),
            None,
            "none in the window"
        );
        assert_eq!(mean(&mut m, 27.0, &at(0.5, 10)), None, "restarted");
        assert_eq!(mean(&mut m, 28.0, &at(0.9, 30)), Some(0.02));
        assert_eq!(mean(&mut m, 29.0, &engine(0.1, 0)), None, "not exported");
    }

    #[test]
    fn the_busy_share_is_the_windows_stepping_time_over_its_length() {
        let cfg = ModelConfig {
            load_window_seconds: 10.0,
            ..ModelConfig::default()
        };
        let mut m = PressureModel::new(cfg);
        let g = GuardSettings::default();
        let at = |busy: f64, steps: u64| EngineReading {
            step_seconds_total: Some(busy),
            steps_total: Some(steps),
            ..engine(0.1, 0)
        };
        let mut busy = |t: f64, e: &EngineReading| {
            let d = m.observe(t, e, &none(), &g);
            (d.busy_share, d.steps_per_second)
        };
        assert_eq!(busy(0.0, &at(0.0, 0)), (None, None), "one sample");
        // 5 s at a quarter busy in 50 steps, then 5 s fully busy in 100 steps.
        assert_eq!(busy(5.0, &at(1.25, 50)), (Some(0.25), Some(10.0)));
        let (share, steps) = busy(10.0, &at(6.25, 150));
        assert!((share.unwrap() - 0.625).abs() < 1e-12, "{share:?}");
        assert_eq!(steps, Some(15.0));
        // The window forgets the first half.
        let (share, _) = busy(15.0, &at(11.25, 250));
        assert!((share.unwrap() - 1.0).abs() < 1e-12, "{share:?}");
        // An engine restart starts the window afresh; an engine without the histogram, none.
        assert_eq!(busy(16.0, &at(0.5, 10)), (None, None), "restarted");
        assert_eq!(busy(18.0, &at(1.5, 30)), (Some(0.5), Some(10.0)));
        assert_eq!(busy(19.0, &engine(0.1, 0)), (None, None), "not exported");
    }

    #[test]
    fn an_engine_restart_does_not_make_a_negative_preemption_rate() {
        let mut m = PressureModel::new(ModelConfig::default());
        m.observe(0.0, &engine(0.3, 50), &none(), &GuardSettings::default());
        let d = m.observe(0.25, &engine(0.0, 0), &none(), &GuardSettings::default());
        assert_eq!(d.preemptions_per_second, 0.0);
    }

    #[test]
    fn device_memory_gives_headroom_and_its_own_forecast() {
        let mut m = PressureModel::new(ModelConfig::default());
        let dev = |used: u64| DeviceReading {
            backend: "nvml".into(),
            memory_used_bytes: Some(used),
            memory_total_bytes: Some(1000),
            ..Default::default()
        };
        m.observe(0.0, &engine(0.1, 0), &dev(800), &GuardSettings::default());
        let d = m.observe(1.0, &engine(0.1, 0), &dev(900), &GuardSettings::default());
        assert!((d.headroom_ratio - 0.1).abs() < 1e-9);
        assert!((d.device_seconds_to_full.unwrap() - 1.0).abs() < 1e-9);
    }

    proptest! {
        #[test]
        fn slope_recovers_a_line(a in -1.0f64..1.0, b in -5.0f64..5.0, n in 2usize..40) {
            let pts: Vec<(f64, f64)> = (0..n).map(|i| (i as f64 * 0.25, a + b * i as f64 * 0.25)).collect();
            let s = slope(pts.iter().copied()).unwrap();
            prop_assert!((s - b).abs() < 1e-6);
        }

        #[test]
        fn forecasts_are_never_negative_and_headroom_stays_in_range(
            usages in proptest::collection::vec(0.0f64..1.2, 1..60),
            preempt in proptest::collection::vec(0u64..5, 1..60),
        ) {
            let mut m = PressureModel::new(ModelConfig::default());
            let mut total = 0;
            for (i, u) in usages.iter().enumerate() {
                total += preempt[i % preempt.len()];
                let d = m.observe(i as f64 * 0.25, &engine(*u, total), &none(), &GuardSettings::default());
                prop_assert!((0.0..=1.0).contains(&d.headroom_ratio));
                prop_assert!(d.seconds_to_redline.is_none_or(|t| t >= 0.0));
                prop_assert!(d.preemptions_per_second >= 0.0);
            }
        }

        /// Hysteresis: the level never drops without `calm_seconds` of calm before it, and it
        /// never sits below what the entering thresholds call for.
        #[test]
        fn the_level_only_drops_after_a_calm_period(
            usages in proptest::collection::vec(0.0f64..1.0, 2..120),
        ) {
            let cfg = ModelConfig::default();
            let mut m = PressureModel::new(cfg);
            let mut last = Level::Ok;
            let mut last_raise = f64::NEG_INFINITY;
            for (i, u) in usages.iter().enumerate() {
                let t = i as f64 * 0.25;
                let d = m.observe(t, &engine(*u, 0), &none(), &GuardSettings::default());
                if d.level > last {
                    last_raise = t;
                }
                if d.level < last {
                    prop_assert!(t - last_raise >= cfg.calm_seconds, "dropped at {t}, raised at {last_raise}");
                }
                if *u >= GuardSettings::default().redline_ratio {
                    prop_assert_eq!(d.level, Level::Critical);
                }
                last = d.level;
            }
        }
    }
}
