//! The sidecar's own Prometheus metrics (prefix `redline_sidecar_`), for people and dashboards;
//! neither control loop needs a Prometheus server.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use redline_api::{DeviceReading, PressureReport};

pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    kv_usage: Gauge,
    headroom: Gauge,
    growth: Gauge,
    decode_growth: Gauge,
    release: Gauge,
    seconds_to_redline: Gauge,
    level: IntGauge,
    sample_age: Gauge,
    engine_up: IntGauge,
    preemption_rate: Gauge,
    mean_itl: Gauge,
    busy_share: Gauge,
    steps_per_second: Gauge,
    device_used: Gauge,
    device_total: Gauge,
    device_util: Gauge,
    device_temp: Gauge,
    device_power: Gauge,
    limit_seqs: IntGauge,
    limit_tokens: IntGauge,
    pub guard_actions: IntCounterVec,
    /// From the start of the engine scrape that showed the pressure to the engine's
    /// acknowledgement of the guard's cut.
    pub guard_reaction: Histogram,
    /// Calls to the engine's admin API that failed (`call`: `limits`, `drain`): it did not
    /// answer, or refused (a 409 for a drain lift after SIGTERM).
    pub admin_errors: IntCounterVec,
    pub scrapes: IntCounter,
    pub scrape_errors: IntCounter,
    pub unauthorized: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        // Every metric's name as registered (a labelled family with no series yet is left
        // out of what the registry gathers).
        let names = std::cell::RefCell::new(Vec::new());
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            names
                .borrow_mut()
                .extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("unique metric");
        };
        let opts = |n: &str, h: &str| Opts::new(format!("redline_sidecar_{n}"), h);
        let g = |n: &str, h: &str| {
            let g = Gauge::with_opts(opts(n, h)).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let ig = |n: &str, h: &str| {
            let g = IntGauge::with_opts(opts(n, h)).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let c = |n: &str, h: &str| {
            let c = IntCounter::with_opts(opts(n, h)).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let guard_reaction = Histogram::with_opts(
            HistogramOpts::new(
                "redline_sidecar_guard_reaction_seconds",
                "From the engine scrape that showed the pressure to the engine applying the \
                 guard's cut (the pressure arose at most one interval before that scrape).",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("valid metric");
        reg(Box::new(guard_reaction.clone()));
        let guard_actions = IntCounterVec::new(
            opts("guard_actions_total", "Limit changes by the fast guard."),
            &["direction", "reason"],
        )
        .expect("valid metric");
        reg(Box::new(guard_actions.clone()));
        let admin_errors = IntCounterVec::new(
            opts(
                "engine_admin_errors_total",
                "Calls to the engine's admin API that failed (unreachable or refused).",
            ),
            &["call"],
        )
        .expect("valid metric");
        reg(Box::new(admin_errors.clone()));
        Self {
            kv_usage: g("kv_usage_ratio", "The engine's KV-cache usage (0..1)."),
            headroom: g(
                "headroom_ratio",
                "1 - the tighter of KV and device memory usage.",
            ),
            growth: g(
                "kv_growth_per_second",
                "KV usage growth (ratio of the pool per second).",
            ),
            decode_growth: g(
                "kv_decode_growth_per_second",
                "KV growth from the running sequences' decoding less what completions free, \
                 what the forecast extrapolates (ratio of the pool per second; NaN when the \
                 pool's size in tokens is unknown).",
            ),
            release: g(
                "kv_release_per_second",
                "KV blocks finished requests give back (ratio of the pool per second; NaN \
                 when the engine does not count them).",
            ),
            seconds_to_redline: g(
                "seconds_to_redline",
                "Predicted seconds until KV usage reaches the redline (+Inf when not rising).",
            ),
            level: ig("level", "Pressure level: 0 ok, 1 elevated, 2 critical."),
            sample_age: g(
                "sample_age_seconds",
                "Seconds since the last successful engine scrape.",
            ),
            engine_up: ig("engine_up", "1 when the last engine scrape succeeded."),
            preemption_rate: g("preemptions_per_second", "The engine's preemption rate."),
            mean_itl: g(
                "mean_inter_token_latency_seconds",
                "The engine's mean inter-token latency over the last minute (NaN when it \
                 exports no histogram or nothing decoded).",
            ),
            busy_share: g(
                "engine_busy_share",
                "Share of the last minute the engine spent stepping (NaN when it exports no \
                 step histogram).",
            ),
            steps_per_second: g(
                "engine_steps_per_second",
                "The engine's steps per second over the last minute (NaN as above).",
            ),
            device_used: g("device_memory_used_bytes", "Device memory in use."),
            device_total: g("device_memory_total_bytes", "Device memory in total."),
            device_util: g("device_utilization_ratio", "Device utilization (0..1)."),
            device_temp: g("device_temperature_celsius", "Device temperature."),
            device_power: g("device_power_watts", "Device power draw."),
            limit_seqs: ig(
                "max_num_seqs",
                "The engine's admission limit as the guard holds it.",
            ),
            limit_tokens: ig(
                "max_batched_tokens",
                "The engine's token budget as the guard holds it.",
            ),
            guard_actions,
            admin_errors,
            guard_reaction,
            scrapes: c(
                "scrapes_total",
                "Engine scrapes attempted (one per loop tick).",
            ),
            scrape_errors: c("scrape_errors_total", "Failed engine scrapes."),
            unauthorized: c(
                "unauthorized_requests_total",
                "Requests refused for a wrong or missing token.",
            ),
            names: names.into_inner(),
            registry,
        }
    }
}

fn set_opt(g: &Gauge, v: Option<f64>) {
    g.set(v.unwrap_or(f64::NAN));
}

impl Metrics {
    pub fn record(&self, r: &PressureReport) {
        if let Some(e) = &r.engine {
            self.kv_usage.set(e.kv_usage_ratio);
        }
        self.headroom.set(r.derived.headroom_ratio);
        self.growth.set(r.derived.kv_growth_per_second);
        set_opt(&self.decode_growth, r.derived.kv_decode_growth_per_second);
        set_opt(&self.release, r.derived.kv_release_per_second);
        self.seconds_to_redline
            .set(r.derived.seconds_to_redline.unwrap_or(f64::INFINITY));
        self.level.set(r.derived.level as i64);
        set_opt(&self.sample_age, r.sample_age_seconds);
        self.engine_up.set(i64::from(r.engine_reachable));
        self.preemption_rate.set(r.derived.preemptions_per_second);
        set_opt(&self.mean_itl, r.derived.mean_inter_token_latency_seconds);
        set_opt(&self.busy_share, r.derived.busy_share);
        set_opt(&self.steps_per_second, r.derived.steps_per_second);
        self.record_device(&r.device);
        if let Some(l) = r.limits.guard_limits {
            self.limit_seqs.set(l.max_num_seqs.into());
            self.limit_tokens.set(l.max_batched_tokens.into());
        }
    }

    fn record_device(&self, d: &DeviceReading) {
        set_opt(&self.device_used, d.memory_used_bytes.map(|v| v as f64));
        set_opt(&self.device_total, d.memory_total_bytes.map(|v| v as f64));
        set_opt(&self.device_util, d.utilization_ratio);
        set_opt(&self.device_temp, d.temperature_celsius);
        set_opt(&self.device_power, d.power_watts);
    }

    /// Every metric this exports (for the chart's dashboard test).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}

#[cfg(test)]
mod tests {
    use redline_api::prom::Exposition;

    #[test]
    fn the_page_parses_with_an_infinite_forecast_and_unknown_device_readings() {
        let m = super::Metrics::default();
        // Not rising: no redline ahead. No device temperature known.
        m.seconds_to_redline.set(f64::INFINITY);
        super::set_opt(&m.device_temp, None);
        m.guard_actions
            .with_label_values(&["down", "forecast"])
            .inc_by(2);
        m.guard_actions.with_label_values(&["up", "calm"]).inc();
        m.guard_reaction.observe(0.3);
        m.guard_reaction.observe(1.7);
        let e = Exposition::parse(&m.render()).expect("the sidecar's own page parses");
        assert_eq!(
            e.sum("redline_sidecar_seconds_to_redline"),
            Some(f64::INFINITY)
        );
        assert!(e
            .sum("redline_sidecar_device_temperature_celsius")
            .unwrap()
            .is_nan());
        let down = e.sum_where(
            "redline_sidecar_guard_actions_total",
            &[("direction", "down")],
        );
        assert_eq!(down, Some(2.0));
        let h = e
            .histogram("redline_sidecar_guard_reaction_seconds")
            .unwrap();
        assert_eq!(
            (h.count, h.at_most(0.5), h.at_most(1.0)),
            (2, Some(1), Some(1))
        );
    }
}
