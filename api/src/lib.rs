//! What the sidecar reports (`GET /v1/pressure`) and what the operator sets
//! (`PUT /v1/limits`). Plain data, shared by both programs so the contract is defined once.
//!
//! Units are in the field names (`_bytes`, `_ratio` in 0..=1, `_seconds`, `_per_second`).
//! `None` means "not known" (the backend cannot measure it, or no sample yet), never zero.

use serde::{Deserialize, Serialize};

pub mod admission;
pub mod deadline;
pub mod prom;

/// `GET /v1/pressure`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PressureReport {
    pub device: DeviceReading,
    /// The engine's last successful scrape; `None` before the first one.
    pub engine: Option<EngineReading>,
    pub derived: Derived,
    pub limits: LimitsStatus,
    /// Seconds since the last successful engine scrape; grows while the engine is unreachable, so
    /// the operator can tell stale data from a quiet pod. `None` before the first scrape.
    pub sample_age_seconds: Option<f64>,
    /// Whether the last scrape attempt succeeded.
    pub engine_reachable: bool,
}

/// Memory and health of the device the engine runs on (a GPU through NVML, or the pod's cgroup).
/// Device memory is an out-of-memory headroom signal, not a load signal: engines preallocate
/// their KV pool, so it stays flat under load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceReading {
    /// `nvml`, `cgroup` or `none`.
    pub backend: String,
    pub name: Option<String>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization_ratio: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    /// cgroup PSI `memory.pressure` "some avg10" (percent of time stalled on memory).
    pub memory_stall_percent: Option<f64>,
    pub health: DeviceHealth,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceHealth {
    /// XID errors seen since the sidecar started (NVML critical-error events).
    pub xid_errors: Option<u64>,
    pub last_xid: Option<u64>,
    /// Uncorrected ECC errors since the driver loaded (volatile counter).
    pub ecc_uncorrected: Option<u64>,
}

/// Which metric names the engine exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineFlavor {
    /// redline-engine: full metrics, live limits.
    Redline,
    /// vLLM: observation only (its limits cannot change at run time).
    Vllm,
}

/// One scrape of the engine's `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineReading {
    pub flavor: EngineFlavor,
    pub kv_usage_ratio: f64,
    pub kv_blocks_total: Option<u64>,
    pub kv_blocks_used: Option<u64>,
    /// Tokens per KV block: with `kv_blocks_total`, the pool's size in tokens, which turns
    /// the generated tokens' rate into the pool's growth.
    #[serde(default)]
    pub kv_block_size: Option<u64>,
    pub requests_running: u64,
    pub requests_waiting: u64,
    pub preemptions_total: u64,
    /// The engine's live admission limits (redline-engine only).
    pub limits: Option<Limits>,
    /// Prompt tokens of requests as they arrive, queued or not: the demand, which the admitted
    /// count hides once the engine saturates (vLLM: its processed prompt tokens).
    #[serde(default)]
    pub prompt_tokens_received_total: Option<u64>,
    #[serde(default)]
    pub generation_tokens_total: Option<u64>,
    /// Prompt tokens of the requests waiting for admission: the backlog.
    #[serde(default)]
    pub waiting_prompt_tokens: Option<u64>,
    /// Whether the engine is draining (not ready, finishing what it holds; refusing new
    /// requests once its lame duck is over).
    #[serde(default)]
    pub draining: Option<bool>,
    /// Whether a drain's lame duck runs: not ready, yet still admitting until the Service has
    /// stopped sending, so an empty engine is not empty for good (`None` for engines without
    /// one: their drain refuses at once).
    #[serde(default)]
    pub lame_duck: Option<bool>,
    /// Whether the engine got SIGTERM: its drain then ends with the process, and is not one to
    /// lift (`None` for engines that do not say).
    #[serde(default)]
    pub shutting_down: Option<bool>,
    /// Requests whose first token came after the engine's TTFT objective (redline-engine
    /// given one; `None` for engines that do not count them).
    #[serde(default)]
    pub requests_late_total: Option<u64>,
    /// Requests that got their first token (the TTFT histogram's count): what the late ones
    /// are a share of.
    #[serde(default)]
    pub first_tokens_total: Option<u64>,
    /// The inter-token latency histogram's sum (seconds) and count. Over a window their
    /// increases' ratio is the mean gap between a sequence's tokens, which is the engine's
    /// step time: its fixed cost stretched by the work the load brings.
    #[serde(default)]
    pub inter_token_seconds_total: Option<f64>,
    #[serde(default)]
    pub inter_tokens_total: Option<u64>,
    /// The step-duration histogram's sum (seconds the engine spent stepping) and count
    /// (steps). Over a window, the first's rate is the share of the time the engine was
    /// busy, and the second's times the fixed cost of a step is the part of it any batch
    /// takes: what is left is the work the load brings, weighed by time (the inter-token
    /// histogram weighs a step by the sequences decoding in it).
    #[serde(default)]
    pub step_seconds_total: Option<f64>,
    #[serde(default)]
    pub steps_total: Option<u64>,
    /// KV blocks given back by sequences that finished (or were cancelled), not by
    /// preemptions. Over a window, its rate over the pool is what completions take off the
    /// running sequences' growth.
    #[serde(default)]
    pub kv_blocks_freed_total: Option<u64>,
    /// The share of the KV pool an admission beside running requests may fill (redline-
    /// engine: the sidecar sets it to the guard's redline).
    #[serde(default)]
    pub max_kv_usage: Option<f64>,
}

impl EngineReading {
    /// A reading with only the flavor and KV usage known (nothing running, counters at zero).
    pub fn new(flavor: EngineFlavor, kv_usage_ratio: f64) -> Self {
        Self {
            flavor,
            kv_usage_ratio,
            kv_blocks_total: None,
            kv_blocks_used: None,
            kv_block_size: None,
            requests_running: 0,
            requests_waiting: 0,
            preemptions_total: 0,
            limits: None,
            prompt_tokens_received_total: None,
            generation_tokens_total: None,
            waiting_prompt_tokens: None,
            draining: None,
            lame_duck: None,
            shutting_down: None,
            requests_late_total: None,
            first_tokens_total: None,
            inter_token_seconds_total: None,
            inter_tokens_total: None,
            step_seconds_total: None,
            steps_total: None,
            kv_blocks_freed_total: None,
            max_kv_usage: None,
        }
    }
}

/// Pressure, derived by the sidecar's model from the readings over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Derived {
    /// 1 - KV usage (the tighter of the KV pool and device memory when both are known).
    pub headroom_ratio: f64,
    /// KV usage growth, ratio of the pool per second (least squares over the window).
    pub kv_growth_per_second: f64,
    /// The growth the running sequences' decoding makes (generated tokens over the pool's
    /// tokens, per second), less what completions free (`kv_release_per_second`, where the
    /// engine counts it); admissions left out: what the forecast extrapolates. `None` when
    /// the engine does not say how large its pool is in tokens, and the forecast
    /// extrapolates `kv_growth_per_second` instead.
    #[serde(default)]
    pub kv_decode_growth_per_second: Option<f64>,
    /// The share of the pool per second that finished requests give back (the smaller of its
    /// rate over the last 10 s and over the growth window); `None` when the engine does not
    /// count freed blocks (vLLM).
    #[serde(default)]
    pub kv_release_per_second: Option<f64>,
    /// Predicted seconds until KV usage reaches the redline ratio; `None` when not rising.
    pub seconds_to_redline: Option<f64>,
    /// Predicted seconds until device memory is full; `None` when not rising or not known.
    pub device_seconds_to_full: Option<f64>,
    pub preemptions_per_second: f64,
    pub level: Level,
    /// Arriving prompt tokens and generated tokens per second over the window; `None` when the
    /// engine does not export them or there is no window yet.
    #[serde(default)]
    pub prompt_tokens_per_second: Option<f64>,
    #[serde(default)]
    pub generation_tokens_per_second: Option<f64>,
    /// Requests served after the TTFT objective, per second over the window: the SLO being
    /// missed, as the engine saw it. `None` when the engine does not count them.
    #[serde(default)]
    pub late_requests_per_second: Option<f64>,
    /// Requests that got their first token, per second over the window (same source).
    #[serde(default)]
    pub first_tokens_per_second: Option<f64>,
    /// The mean inter-token latency over the load window (a minute by default: long enough
    /// to see past a burst, so it says how loaded the engine runs, not what one burst did).
    /// `None` when the engine does not export the histogram or no token came in the window.
    #[serde(default)]
    pub mean_inter_token_latency_seconds: Option<f64>,
    /// The share of the load window the engine spent stepping, and its steps per second
    /// (same window). `None` when the engine does not export its step histogram.
    #[serde(default)]
    pub busy_share: Option<f64>,
    #[serde(default)]
    pub steps_per_second: Option<f64>,
    /// The pod's arrival curve: for each window of [`ARRIVAL_WINDOWS_SECONDS`], the most prompt
    /// tokens that arrived within any such window lately. Empty when the engine does not count
    /// prompt tokens on arrival.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_arrival_peaks: Vec<ArrivalPeak>,
}

/// The most prompt tokens that arrived within any `window_seconds` lately.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArrivalPeak {
    pub window_seconds: f64,
    pub tokens: u64,
}

/// The windows a sidecar measures its engine's arrival curve over: from a fraction of a TTFT
/// objective (a burst that lands at once) to about half a minute (a rate).
pub const ARRIVAL_WINDOWS_SECONDS: [f64; 7] = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0];

impl Default for Derived {
    fn default() -> Self {
        Self {
            headroom_ratio: 1.0,
            kv_growth_per_second: 0.0,
            kv_decode_growth_per_second: None,
            kv_release_per_second: None,
            seconds_to_redline: None,
            device_seconds_to_full: None,
            preemptions_per_second: 0.0,
            level: Level::Ok,
            prompt_tokens_per_second: None,
            generation_tokens_per_second: None,
            late_requests_per_second: None,
            first_tokens_per_second: None,
            mean_inter_token_latency_seconds: None,
            busy_share: None,
            steps_per_second: None,
            prompt_arrival_peaks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Elevated,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Elevated => "elevated",
            Level::Critical => "critical",
        }
    }
}

/// An engine's admission limits (the engine's `/admin/limits` body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_num_seqs: u32,
    pub max_batched_tokens: u32,
}

impl Limits {
    pub const fn new(max_num_seqs: u32, max_batched_tokens: u32) -> Self {
        Self {
            max_num_seqs,
            max_batched_tokens,
        }
    }
}

/// `PUT /v1/limits`: the operator's target for this pod. The guard moves the engine's limits
/// inside `[min, target]`; a target of `max_num_seqs: 0` drains the pod (admits nothing).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    pub max_num_seqs: u32,
    pub max_batched_tokens: u32,
    /// The guard never goes below these (defaults: 1 sequence, one KV block's worth of tokens).
    #[serde(default)]
    pub min_num_seqs: Option<u32>,
    #[serde(default)]
    pub min_batched_tokens: Option<u32>,
    #[serde(default)]
    pub guard: Option<GuardSettings>,
    /// Drain the pod: the engine refuses new requests (and reports not ready, so the Service
    /// stops sending them) and finishes the ones it holds, queued included. The operator's
    /// scale-down: the pod is removed once it is empty. `false` cancels a drain.
    #[serde(default)]
    pub drain: bool,
}

impl LimitsRequest {
    /// The operator's request: a target, the guard's settings and whether to drain, with the
    /// sidecar's own floor.
    pub fn target(limits: Limits, guard: GuardSettings, drain: bool) -> Self {
        Self {
            max_num_seqs: limits.max_num_seqs,
            max_batched_tokens: limits.max_batched_tokens,
            min_num_seqs: None,
            min_batched_tokens: None,
            guard: Some(guard),
            drain,
        }
    }
}

/// The fast guard's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    pub enabled: bool,
    /// Act when the KV pool is predicted to reach the redline within this many seconds.
    pub horizon_seconds: f64,
    /// KV usage ratio treated as redlined.
    pub redline_ratio: f64,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            horizon_seconds: 5.0,
            redline_ratio: 0.9,
        }
    }
}

/// The limits part of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsStatus {
    /// The operator's target; until it sets one, the limits the engine started with. `None`
    /// before either is known (and always for engines without live limits, such as vLLM).
    pub target: Option<Limits>,
    /// The guard's floor (the operator's, else 1 sequence and 64 tokens), capped by the target.
    pub min_num_seqs: u32,
    pub min_batched_tokens: u32,
    /// What the guard last asked the engine for; `None` until it first acts.
    pub guard_limits: Option<Limits>,
    /// Why the guard last changed the limits.
    pub guard_reason: Option<String>,
    pub guard: GuardSettings,
    /// The operator asked this pod to drain.
    #[serde(default)]
    pub drain: bool,
}

/// Least-squares slope of `points` (x, y); `None` with fewer than two distinct x. The one
/// trend fit the sidecar (KV growth) and the autoscaling policy (demand trend) share.
pub fn slope(points: impl Iterator<Item = (f64, f64)> + Clone) -> Option<f64> {
    let n = points.clone().count() as f64;
    if n < 2.0 {
        return None;
    }
    let (sx, sy) = points
        .clone()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (sxx, sxy) = points.fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (x - mx), b + (x - mx) * (y - my))
    });
    (sxx > 1e-12).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_request_defaults_and_rejects_unknown_fields() {
        let r: LimitsRequest =
            serde_json::from_str(r#"{"max_num_seqs": 8, "max_batched_tokens": 256}"#).unwrap();
        assert_eq!(r.min_num_seqs, None);
        assert!(r.guard.is_none() && !r.drain);
        let e = serde_json::from_str::<LimitsRequest>(
            r#"{"max_num_seqs": 8, "max_batched_tokens": 256, "max_seqs": 3}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn levels_order_and_serialize_lowercase() {
        assert!(Level::Critical > Level::Elevated && Level::Elevated > Level::Ok);
        assert_eq!(
            serde_json::to_string(&Level::Elevated).unwrap(),
            "\"elevated\""
        );
    }
}
