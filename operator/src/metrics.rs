//! The operator's own Prometheus metrics (prefix `redline_operator_`).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    pub events: IntCounterVec,
    pub pressure_reads: IntCounterVec,
    pub scaling_decisions: IntCounterVec,
    pub autoscale_pass: Histogram,
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("redline_operator_reconciles_total", "Reconciliations run").unwrap();
        let errors = IntCounterVec::new(
            Opts::new(
                "redline_operator_reconcile_errors_total",
                "Failed reconciliations by error kind",
            ),
            &["kind"],
        )
        .unwrap();
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "redline_operator_reconcile_duration_seconds",
                "Duration of one reconciliation",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .unwrap();
        let events = IntCounterVec::new(
            Opts::new(
                "redline_operator_events_total",
                "Events published by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let pressure_reads = IntCounterVec::new(
            Opts::new(
                "redline_operator_pressure_reads_total",
                "Sidecar pressure reports read, by result",
            ),
            &["result"],
        )
        .unwrap();
        let scaling_decisions = IntCounterVec::new(
            Opts::new(
                "redline_operator_scaling_decisions_total",
                "Autoscaling actions taken, by action",
            ),
            &["action"],
        )
        .unwrap();
        let autoscale_pass = Histogram::with_opts(
            HistogramOpts::new(
                "redline_operator_autoscale_pass_duration_seconds",
                "Duration of one autoscaling pass over every service (the loop runs one every \
                 interval; a pass longer than it delays every decision)",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .unwrap();
        let leader = IntGauge::new(
            "redline_operator_leader",
            "1 while this instance leads and reconciles (set from its election role when scraped)",
        )
        .unwrap();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(events.clone()),
            Box::new(pressure_reads.clone()),
            Box::new(scaling_decisions.clone()),
            Box::new(autoscale_pass.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            events,
            pressure_reads,
            scaling_decisions,
            autoscale_pass,
            leader,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .unwrap_or_default();
        buf
    }
}
