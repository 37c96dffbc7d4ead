//! Prometheus metrics: redline's own names (`redline_engine_*`, the contract the sidecar reads)
//! and vLLM-compatible aliases (`vllm:*`, labelled with `model_name` as vLLM does) so KEDA
//! recipes and dashboards written for vLLM work unchanged.

use crate::engine::Stats;
use crate::scheduler::Limits;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    kv_blocks_total: IntGauge,
    kv_blocks_used: IntGauge,
    kv_block_size: IntGauge,
    kv_usage: Gauge,
    running: IntGauge,
    waiting: IntGauge,
    preemptions: IntCounter,
    kv_blocks_freed: IntCounter,
    prefix_hit_tokens: IntCounter,
    pub prompt_tokens: IntCounter,
    pub prompt_tokens_received: IntCounter,
    pub waiting_prompt_tokens: IntGauge,
    pub generation_tokens: IntCounter,
    max_num_seqs: IntGauge,
    max_batched_tokens: IntGauge,
    max_kv_usage: Gauge,
    pub draining: IntGauge,
    pub lame_duck: IntGauge,
    pub shutting_down: IntGauge,
    /// OpenAI API calls refused for a missing or wrong key: a client left behind by a key
    /// rotation shows here.
    pub unauthorized: IntCounter,
    ttft: Histogram,
    /// Requests whose first token came after the TTFT objective, when the engine has one.
    late: IntCounter,
    itl: Histogram,
    /// Every engine step's duration: its sum over a window is the time the engine was busy,
    /// and its count times a lone sequence's step the part of it any batch would take, so the
    /// rest is the load's work (the autoscaler's load share).
    step: Histogram,
    pub request_latency: Histogram,
    vllm_kv_usage: Gauge,
    vllm_running: IntGauge,
    vllm_waiting: IntGauge,
    vllm_preemptions: IntCounter,
    vllm_ttft: Histogram,
    vllm_itl: Histogram,
}

const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
];
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
];

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        let r = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            r.register(c).expect("metric names are unique");
        };
        let p = |n: &str| format!("redline_engine_{n}");
        let int_gauge = |n: String, help: &str| {
            let g = IntGauge::new(n, help).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let counter = |o: Opts| {
            let c = IntCounter::with_opts(o).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let gauge = |o: Opts| {
            let g = Gauge::with_opts(o).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let hist = |o: HistogramOpts| {
            let h = Histogram::with_opts(o).expect("valid metric");
            reg(Box::new(h.clone()));
            h
        };
        let vllm = |n: &str, help: &str| {
            Opts::new(format!("vllm:{n}"), help).const_label("model_name", model_name)
        };
        let vllm_int_gauge = |n: &str, help: &str| {
            let g = IntGauge::with_opts(vllm(n, help)).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let vllm_hist = |n: &str, help: &str, b: &[f64]| {
            hist(HistogramOpts::from(vllm(n, help)).buckets(b.to_vec()))
        };
        Self {
            kv_blocks_total: int_gauge(p("kv_blocks_total"), "KV cache blocks in the pool."),
            kv_blocks_used: int_gauge(p("kv_blocks_used"), "KV cache blocks held by sequences."),
            kv_block_size: int_gauge(p("kv_block_size"), "Tokens per KV cache block."),
            kv_usage: gauge(Opts::new(
                p("kv_cache_usage_ratio"),
                "Used / total KV blocks (0..1).",
            )),
            running: int_gauge(p("requests_running"), "Sequences in the running batch."),
            waiting: int_gauge(p("requests_waiting"), "Sequences queued for admission."),
            preemptions: counter(Opts::new(
                p("preemptions_total"),
                "Sequences preempted (recomputed later) for lack of KV blocks.",
            )),
            kv_blocks_freed: counter(Opts::new(
                p("kv_blocks_freed_total"),
                "KV cache blocks given back by finished or aborted requests (not by preemptions).",
            )),
            prefix_hit_tokens: counter(Opts::new(
                p("prefix_cache_hit_tokens_total"),
                "Prompt tokens served from the prefix cache.",
            )),
            late: counter(Opts::new(
                p("requests_late_total"),
                "Requests whose first token came after the TTFT objective (--ttft-objective-ms; \
                 stays 0 without one).",
            )),
            prompt_tokens: counter(Opts::new(
                p("prompt_tokens_total"),
                "Prompt tokens admitted.",
            )),
            prompt_tokens_received: counter(Opts::new(
                p("prompt_tokens_received_total"),
                "Prompt tokens of requests as they arrive, admitted or still waiting (demand).",
            )),
            waiting_prompt_tokens: int_gauge(
                p("waiting_prompt_tokens"),
                "Tokens the waiting requests must compute when admitted (backlog).",
            ),
            generation_tokens: counter(Opts::new(
                p("generation_tokens_total"),
                "Tokens generated.",
            )),
            max_num_seqs: int_gauge(
                p("max_num_seqs"),
                "Live admission limit on running sequences.",
            ),
            max_batched_tokens: int_gauge(
                p("max_batched_tokens"),
                "Live limit on tokens per engine step.",
            ),
            max_kv_usage: gauge(Opts::new(
                p("max_kv_usage"),
                "Live share of the KV pool an admission beside running requests may fill.",
            )),
            draining: int_gauge(
                p("draining"),
                "1 while the engine drains: not ready, finishing what it holds (and, in the drain's \
                 lame-duck period, still admitting).",
            ),
            lame_duck: int_gauge(
                p("lame_duck"),
                "1 while a drain's lame-duck period runs: not ready, yet admitting new requests \
                 until the Service has stopped sending (--lame-duck-seconds).",
            ),
            shutting_down: int_gauge(
                p("shutting_down"),
                "1 once SIGTERM came: the drain ends with the process and cannot be lifted.",
            ),
            unauthorized: counter(Opts::new(
                p("requests_unauthorized_total"),
                "OpenAI API calls refused for a missing or wrong API key (--api-key).",
            )),
            ttft: hist(
                HistogramOpts::new(p("time_to_first_token_seconds"), "Time to first token.")
                    .buckets(TTFT_BUCKETS.to_vec()),
            ),
            itl: hist(
                HistogramOpts::new(
                    p("inter_token_latency_seconds"),
                    "Time between output tokens.",
                )
                .buckets(ITL_BUCKETS.to_vec()),
            ),
            step: hist(
                HistogramOpts::new(
                    p("step_duration_seconds"),
                    "Duration of each engine step (a forward pass over the scheduled batch).",
                )
                .buckets(STEP_BUCKETS.to_vec()),
            ),
            request_latency: hist(
                HistogramOpts::new(p("request_latency_seconds"), "Arrival to last token.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            ),
            vllm_kv_usage: gauge(vllm(
                "kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            )),
            vllm_running: vllm_int_gauge(
                "num_requests_running",
                "Number of requests in model execution batches.",
            ),
            vllm_waiting: vllm_int_gauge(
                "num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            vllm_preemptions: counter(vllm(
                "num_preemptions_total",
                "Cumulative number of preemptions.",
            )),
            vllm_ttft: vllm_hist(
                "time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            ),
            vllm_itl: vllm_hist(
                "inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS,
            ),
            registry: r,
        }
    }

    /// A first token `s` seconds after the request arrived; late past `objective` (seconds).
    pub fn observe_ttft(&self, s: f64, objective: Option<f64>) {
        self.ttft.observe(s);
        self.vllm_ttft.observe(s);
        if objective.is_some_and(|o| s > o) {
            self.late.inc();
        }
    }

    pub fn observe_itl(&self, s: f64) {
        self.itl.observe(s);
        self.vllm_itl.observe(s);
    }

    pub fn observe_step(&self, s: f64) {
        self.step.observe(s);
    }

    /// Publishes the engine's state after a step.
    pub fn set_state(&self, s: &Stats, l: Limits) {
        let usage = if s.kv_blocks_total == 0 {
            0.0
        } else {
            s.kv_blocks_used as f64 / s.kv_blocks_total as f64
        };
        self.kv_blocks_total.set(s.kv_blocks_total as i64);
        self.kv_blocks_used.set(s.kv_blocks_used as i64);
        self.kv_block_size.set(s.kv_block_size as i64);
        self.kv_usage.set(usage);
        self.vllm_kv_usage.set(usage);
        self.running.set(s.running as i64);
        self.vllm_running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.vllm_waiting.set(s.waiting as i64);
        let new_preempt = advance(&self.preemptions, s.preemptions_total);
        self.vllm_preemptions.inc_by(new_preempt);
        advance(&self.kv_blocks_freed, s.kv_blocks_freed_total);
        advance(&self.prefix_hit_tokens, s.prefix_hit_tokens);
        advance(&self.prompt_tokens_received, s.prompt_tokens_received);
        self.waiting_prompt_tokens.set(s.waiting_tokens as i64);
        self.set_limits(l);
    }

    pub fn set_limits(&self, l: Limits) {
        self.max_num_seqs.set(l.max_num_seqs as i64);
        self.max_batched_tokens.set(l.max_batched_tokens as i64);
        self.max_kv_usage.set(l.max_kv_usage);
    }

    /// Every metric this exports (each one has a series from the start).
    pub fn names(&self) -> Vec<String> {
        self.registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect()
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

/// Brings `counter` up to the engine's running `total` and returns by how much it rose (the
/// engine keeps its own totals; the exported counter follows them after each step).
fn advance(counter: &IntCounter, total: u64) -> u64 {
    let new = total.saturating_sub(counter.get());
    counter.inc_by(new);
    new
}
