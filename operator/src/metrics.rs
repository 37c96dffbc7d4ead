//! The operator's own Prometheus metrics (prefix `redline_operator_`).

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    pub events: IntCounterVec,
    pub pressure_reads: IntCounterVec,
    pub scaling_decisions: IntCounterVec,
    /// Policies that went on from status at this leader's first pass of their service.
    pub policies_restored: IntCounterVec,
    pub autoscale_pass: Histogram,
    pub services: ServiceGauges,
    pub leader: IntGauge,
    names: Vec<String>,
}

/// Per InferenceService, as the leader's autoscaling loop last saw it: with a Prometheus
/// server, load against replicas over time, which `kubectl get` shows only as of now.
/// Labelled `namespace`, `inferenceservice`; a service's series go when it does, and every
/// one when the loop stops (a standby exports none).
pub struct ServiceGauges {
    /// Replicas the service should run: the policy's decision, or the spec's.
    pub desired: GaugeVec,
    pub ready: GaugeVec,
    /// The policy's demand now and its forecast over the horizon, in replicas.
    pub demand: GaugeVec,
    pub forecast: GaugeVec,
    /// KV usage, mean and highest over the pods that reported.
    pub kv_usage: GaugeVec,
    pub kv_usage_max: GaugeVec,
    /// Requests served after the TTFT objective, per second, summed over the pods.
    pub late: GaugeVec,
    /// The SLO's error budget burn rate the policy sizes by.
    pub burn: GaugeVec,
}

impl ServiceGauges {
    fn new() -> Self {
        let g = |name: &str, help: &str| {
            GaugeVec::new(
                Opts::new(format!("redline_operator_service_{name}"), help),
                &["namespace", "inferenceservice"],
            )
            .unwrap()
        };
        Self {
            desired: g(
                "desired_replicas",
                "Replicas the InferenceService should run (the autoscaling decision, or the spec)",
            ),
            ready: g(
                "ready_replicas",
                "Engine pods serving (Ready, not being deleted; a draining pod is not)",
            ),
            demand: g(
                "demand_replicas",
                "The autoscaling policy's demand now, in replicas at its targets",
            ),
            forecast: g(
                "forecast_replicas",
                "The autoscaling policy's demand forecast over its horizon, in replicas",
            ),
            kv_usage: g(
                "kv_usage_ratio",
                "Mean KV-cache usage over the pods that reported",
            ),
            kv_usage_max: g(
                "kv_usage_max_ratio",
                "Highest KV-cache usage of a pod that reported",
            ),
            late: g(
                "late_requests_per_second",
                "Requests whose first token came after the TTFT objective, per second",
            ),
            burn: g(
                "error_budget_burn_rate",
                "Late requests over the ones the TTFT objective allows, over the budget's window",
            ),
        }
    }

    fn all(&self) -> [&GaugeVec; 8] {
        [
            &self.desired,
            &self.ready,
            &self.demand,
            &self.forecast,
            &self.kv_usage,
            &self.kv_usage_max,
            &self.late,
            &self.burn,
        ]
    }

    /// Removes every series of one service.
    pub fn forget(&self, ns: &str, name: &str) {
        for g in self.all() {
            let _ = g.remove_label_values(&[ns, name]);
        }
    }

    /// Removes every series.
    pub fn clear(&self) {
        for g in self.all() {
            g.reset();
        }
    }
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
        let policies_restored = IntCounterVec::new(
            Opts::new(
                "redline_operator_policies_restored_total",
                "Autoscaling policies that went on from status.autoscalerMemory (when this \
                 instance took over, or a pause ended): from the memory kept as the last \
                 leader went, or from the memory and demand history a stopped one handed over",
            ),
            &["from"],
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
        let services = ServiceGauges::new();
        let mut names = Vec::new();
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
            Box::new(policies_restored.clone()),
            Box::new(autoscale_pass.clone()),
            Box::new(leader.clone()),
        ]
        .into_iter()
        .chain(
            services
                .all()
                .map(|g| Box::new(g.clone()) as Box<dyn prometheus::core::Collector>),
        ) {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
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
            policies_restored,
            autoscale_pass,
            services,
            leader,
            names,
        }
    }
}

impl Metrics {
    /// Every metric name registered, vectors without series included (what a dashboard may
    /// query).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn render(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .unwrap_or_default();
        buf
    }
}

/// Sets one service's series of `g`, or removes it where there is no value.
pub fn set_or_remove(g: &GaugeVec, ns: &str, name: &str, v: Option<f64>) {
    match v {
        Some(v) => g.with_label_values(&[ns, name]).set(v),
        None => {
            let _ = g.remove_label_values(&[ns, name]);
        }
    }
}
