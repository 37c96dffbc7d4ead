//! The fast loop: every interval read the device, scrape the engine, update the pressure model,
//! let the guard decide, and apply its limits through the engine's localhost admin API. State
//! the HTTP API reads lives in [`Shared`].

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redline_api::{
    Derived, DeviceReading, EngineFlavor, EngineReading, GuardSettings, Limits, LimitsRequest,
    LimitsStatus, PressureReport,
};
use tracing::{info, warn};

use crate::device::Device;
use crate::guard::{max_kv_usage, Bounds, Guard, GuardConfig, Observation};
use crate::metrics::Metrics;
use crate::pressure::{ModelConfig, PressureModel};
use crate::scrape;

#[derive(Debug, Clone)]
pub struct Config {
    pub engine_url: String,
    pub engine_admin_url: String,
    pub interval: Duration,
    pub token_file: PathBuf,
    pub guard: GuardSettings,
    pub model: ModelConfig,
    pub guard_config: GuardConfig,
    /// The limits the pod's engine is configured with: the guard's target until the operator
    /// sets one. Without them, the engine's limits at the first scrape, which after a sidecar
    /// restart may be a cut the last sidecar left (and the guard never recovers past its
    /// target).
    pub configured: Option<Limits>,
}

/// Defaults for the guard's floor when the operator gives none.
const MIN_SEQS: u32 = 1;
const MIN_TOKENS: u32 = 64;

struct State {
    model: PressureModel,
    guard: Option<Guard>,
    /// The operator's target; until it sets one, the configured limits (`Config::configured`),
    /// else the engine's at the first scrape.
    target: Option<Limits>,
    min_seqs: Option<u32>,
    min_tokens: Option<u32>,
    settings: GuardSettings,
    device: DeviceReading,
    engine: Option<EngineReading>,
    derived: Derived,
    last_ok: Option<Instant>,
    reachable: bool,
    guard_reason: Option<String>,
    /// The engine's capacity envelope, from its answer to the last PUT: a target above it
    /// would make the guard "raise" into the clamp every interval.
    ceiling: Option<Limits>,
    /// The last error logged per call (`Call`), so a persisting one is logged once, also
    /// while another call fails beside it.
    last_errors: [Option<String>; 3],
    /// The operator's word on draining: `None` until it first speaks to this process, unless
    /// the engine was drained already (`drain_to_apply`).
    drain: Option<bool>,
}

pub struct Shared {
    state: Mutex<State>,
    pub metrics: Metrics,
    pub token_file: PathBuf,
    started: Instant,
}

impl Shared {
    pub fn new(cfg: &Config) -> Self {
        Self {
            state: Mutex::new(State {
                model: PressureModel::new(cfg.model),
                guard: None,
                target: cfg.configured,
                min_seqs: None,
                min_tokens: None,
                settings: cfg.guard,
                device: DeviceReading::default(),
                engine: None,
                derived: Derived::default(),
                last_ok: None,
                reachable: false,
                guard_reason: None,
                ceiling: None,
                last_errors: Default::default(),
                drain: None,
            }),
            metrics: Metrics::default(),
            token_file: cfg.token_file.clone(),
            started: Instant::now(),
        }
    }

    pub fn report(&self) -> PressureReport {
        let st = self.state.lock().unwrap();
        report(&st)
    }

    /// `PUT /v1/limits`: validated by the caller; applied by the loop's next tick.
    pub fn set_limits(&self, r: LimitsRequest) -> LimitsStatus {
        let mut st = self.state.lock().unwrap();
        st.target = Some(Limits::new(r.max_num_seqs, r.max_batched_tokens));
        st.min_seqs = r.min_num_seqs;
        st.min_tokens = r.min_batched_tokens;
        if let Some(g) = r.guard {
            st.settings = g;
        }
        st.drain = Some(r.drain);
        info!(
            max_num_seqs = r.max_num_seqs,
            max_batched_tokens = r.max_batched_tokens,
            guard = st.settings.enabled,
            drain = r.drain,
            "operator set the limits"
        );
        limits_status(&st)
    }

    /// Logs `msg` unless it is the error `call` logged last.
    fn log_once(st: &mut State, call: Call, msg: String) {
        let last = &mut st.last_errors[call as usize];
        if last.as_deref() != Some(msg.as_str()) {
            warn!("{msg}");
            *last = Some(msg);
        }
    }

    /// A call to the engine's admin API failed: counted every time, logged once.
    fn admin_failed(&self, st: &mut State, call: Call, e: String) {
        self.metrics
            .admin_errors
            .with_label_values(&[call.label()])
            .inc();
        Shared::log_once(st, call, e);
    }

    /// `call` succeeded: its next error is news.
    fn clear_error(st: &mut State, call: Call) {
        st.last_errors[call as usize] = None;
    }
}

/// The sidecar's calls to its engine, for errors logged once per call.
#[derive(Clone, Copy)]
enum Call {
    Scrape,
    Limits,
    Drain,
}

impl Call {
    /// The `call` label of `redline_sidecar_engine_admin_errors_total`.
    fn label(self) -> &'static str {
        match self {
            Call::Scrape => "scrape",
            Call::Limits => "limits",
            Call::Drain => "drain",
        }
    }
}

/// The guard's floor: the operator's, else one sequence and 64 tokens.
fn floor(st: &State) -> Limits {
    Limits::new(
        st.min_seqs.unwrap_or(MIN_SEQS),
        st.min_tokens.unwrap_or(MIN_TOKENS),
    )
}

/// `[floor, target]`, the target capped by the engine's envelope where known.
fn bounds(st: &State, target: Limits) -> Bounds {
    let target = match st.ceiling {
        Some(c) => Limits::new(
            target.max_num_seqs.min(c.max_num_seqs),
            target.max_batched_tokens.min(c.max_batched_tokens),
        ),
        None => target,
    };
    Bounds::new(floor(st), target)
}

fn limits_status(st: &State) -> LimitsStatus {
    let min = match st.target {
        Some(t) => bounds(st, t).min,
        None => floor(st),
    };
    LimitsStatus {
        target: st.target,
        min_num_seqs: min.max_num_seqs,
        min_batched_tokens: min.max_batched_tokens,
        guard_limits: st.guard.as_ref().map(Guard::current),
        guard_reason: st.guard_reason.clone(),
        guard: st.settings,
        drain: st.drain == Some(true),
    }
}

fn report(st: &State) -> PressureReport {
    PressureReport {
        device: st.device.clone(),
        engine: st.engine.clone(),
        derived: st.derived.clone(),
        limits: limits_status(st),
        sample_age_seconds: st.last_ok.map(|t| t.elapsed().as_secs_f64()),
        engine_reachable: st.reachable,
    }
}

async fn scrape_engine(http: &reqwest::Client, url: &str) -> Result<EngineReading, String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("engine metrics at {url} unreachable: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("engine metrics at {url}: HTTP {}", resp.status()));
    }
    let text = resp
        .text()
        .await
        .map_err(|e| format!("engine metrics at {url}: {e}"))?;
    scrape::parse(&text).map_err(|e| format!("engine metrics at {url}: {e}"))
}

/// The engine's answer to `PUT /admin/limits`: what it applied (clamped into its envelope) and
/// the envelope itself.
#[derive(serde::Deserialize)]
struct Applied {
    #[serde(flatten)]
    limits: Limits,
    ceiling: Option<Limits>,
}

/// `PUT /admin/limits`'s body: the guard's limits and the KV line admission stays under.
#[derive(Debug, serde::Serialize)]
struct EngineLimits {
    #[serde(flatten)]
    limits: Limits,
    max_kv_usage: f64,
}

async fn put_engine_limits(
    http: &reqwest::Client,
    admin: &str,
    l: &EngineLimits,
) -> Result<Applied, String> {
    let url = format!("{admin}/admin/limits");
    // A loaded engine answers between steps: give it longer than a scrape.
    let resp = http
        .put(&url)
        .timeout(Duration::from_secs(5))
        .json(&l)
        .send()
        .await
        .map_err(|e| format!("engine admin API at {url} unreachable: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!(
            "engine refused limits {l:?}: HTTP {status}: {body}"
        ));
    }
    resp.json::<Applied>()
        .await
        .map_err(|e| format!("engine admin API at {url}: {e}"))
}

/// Starts (`POST`) or cancels (`DELETE`) the engine's drain.
async fn set_engine_drain(http: &reqwest::Client, admin: &str, on: bool) -> Result<(), String> {
    let url = format!("{admin}/admin/drain");
    let req = if on {
        http.post(&url)
    } else {
        http.delete(&url)
    };
    let resp = req
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("engine admin API at {url} unreachable: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        // 409: the engine got SIGTERM after the last scrape; it says why.
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("engine drain at {url}: HTTP {status}: {body}"));
    }
    Ok(())
}

/// What to tell the engine about draining, re-checked every tick (so a restarted engine is
/// drained again). The operator decides: a drain it wants is started, one it does not want is
/// lifted. A drain the engine already has before the operator first speaks to this process
/// (an earlier sidecar process's, before this one restarted) is held as the operator's and
/// reported: an operator that no longer drains the pod (a new leader, or autoscaling turned
/// off) then sees it and cancels it; left unreported, the pod would stay drained for good. A
/// SIGTERM drain is the pod ending: never taken for the operator's, never lifted (the engine
/// refuses to anyway), and an engine that does not say whether it is ending is not steered.
fn drain_to_apply(st: &mut State) -> Option<bool> {
    let e = st
        .engine
        .as_ref()
        .filter(|e| e.flavor == EngineFlavor::Redline)?;
    let draining = e.draining?;
    let liftable = e.shutting_down == Some(false);
    if draining && liftable && st.drain.is_none() {
        info!("the engine was drained before this sidecar started (an earlier sidecar's drain): held as the operator's until it says otherwise");
        st.drain = Some(true);
    }
    match (st.drain, draining) {
        (Some(true), false) => Some(true),
        (Some(false), true) if liftable => Some(false),
        _ => None,
    }
}

/// What one tick decided to send to the engine.
struct Apply {
    body: EngineLimits,
    /// Set when the guard changed its mind (vs. re-applying after an engine restart).
    reason: Option<crate::guard::Reason>,
    from: Limits,
}

fn tick_state(
    st: &mut State,
    now: f64,
    scraped: Result<EngineReading, String>,
    gcfg: GuardConfig,
) -> Option<Apply> {
    let reading = match scraped {
        Ok(r) => r,
        Err(e) => {
            st.reachable = false;
            Shared::log_once(st, Call::Scrape, e);
            return None;
        }
    };
    if !st.reachable {
        info!("engine metrics reachable");
        Shared::clear_error(st, Call::Scrape);
        // Possibly a new engine process, with an envelope of its own.
        st.ceiling = None;
    }
    st.reachable = true;
    st.last_ok = Some(Instant::now());
    let derived = st.model.observe(now, &reading, &st.device, &st.settings);
    let running = reading.requests_running;
    let usage = reading.kv_usage_ratio;
    let engine_limits = reading.limits;
    let engine_line = reading.max_kv_usage;
    let flavor = reading.flavor;
    st.engine = Some(reading);
    st.derived = derived.clone();
    // vLLM (or an engine without live limits): observe, never steer.
    let (EngineFlavor::Redline, Some(live)) = (flavor, engine_limits) else {
        return None;
    };
    let target = *st.target.get_or_insert(live);
    let b = bounds(st, target);
    let settings = st.settings;
    let line = max_kv_usage(&settings);
    // An engine that exports no line (an older one) is not told one.
    let line_differs = engine_line.is_some_and(|l| (l - line).abs() > 1e-6);
    let guard = st.guard.get_or_insert_with(|| Guard::new(gcfg, live));
    let from = guard.current();
    let obs = Observation {
        derived: &derived,
        kv_usage: usage,
        running,
    };
    if let Some(c) = guard.step(now, obs, b, &settings) {
        return Some(Apply {
            body: EngineLimits {
                limits: c.limits,
                max_kv_usage: line,
            },
            reason: Some(c.reason),
            from,
        });
    }
    // The engine restarted (or a PUT was lost, or the operator moved the redline): hold it at
    // the guard's limits and line.
    (live != guard.current() || line_differs).then(|| Apply {
        body: EngineLimits {
            limits: guard.current(),
            max_kv_usage: line,
        },
        reason: None,
        from: live,
    })
}

pub async fn run(shared: std::sync::Arc<Shared>, device: Box<dyn Device>, cfg: Config) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1).max(cfg.interval * 2))
        .build()
        .expect("an HTTP client");
    let metrics_url = format!("{}/metrics", cfg.engine_url.trim_end_matches('/'));
    let admin = cfg.engine_admin_url.trim_end_matches('/').to_owned();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let dev = device.read();
        let sampled = Instant::now();
        let scraped = scrape_engine(&http, &metrics_url).await;
        shared.metrics.scrapes.inc();
        if scraped.is_err() {
            shared.metrics.scrape_errors.inc();
        }
        let now = shared.started.elapsed().as_secs_f64();
        let (apply, drain) = {
            let mut st = shared.state.lock().unwrap();
            st.device = dev;
            let apply = tick_state(&mut st, now, scraped, cfg.guard_config);
            (apply, drain_to_apply(&mut st))
        };
        if let Some(on) = drain {
            let result = set_engine_drain(&http, &admin, on).await;
            let mut st = shared.state.lock().unwrap();
            match result {
                Ok(()) => {
                    Shared::clear_error(&mut st, Call::Drain);
                    if on {
                        info!("draining the engine for the operator's scale-down");
                    } else {
                        info!("drain cancelled: the engine admits requests again");
                    }
                }
                Err(e) => shared.admin_failed(&mut st, Call::Drain, e),
            }
        }
        if let Some(a) = apply {
            let result = put_engine_limits(&http, &admin, &a.body).await;
            let mut st = shared.state.lock().unwrap();
            match result {
                Ok(Applied {
                    limits: accepted,
                    ceiling,
                }) => {
                    Shared::clear_error(&mut st, Call::Limits);
                    st.ceiling = ceiling.or(st.ceiling);
                    if let Some(g) = st.guard.as_mut() {
                        g.sync(accepted);
                    }
                    if let Some(r) = a.reason {
                        let direction = if r.is_decrease() { "down" } else { "up" };
                        if r.is_decrease() {
                            shared
                                .metrics
                                .guard_reaction
                                .observe(sampled.elapsed().as_secs_f64());
                        }
                        info!(
                            from_seqs = a.from.max_num_seqs,
                            to_seqs = accepted.max_num_seqs,
                            from_tokens = a.from.max_batched_tokens,
                            to_tokens = accepted.max_batched_tokens,
                            "guard: limits {direction}: {r}"
                        );
                        shared
                            .metrics
                            .guard_actions
                            .with_label_values(&[direction, r.kind()])
                            .inc();
                        st.guard_reason = Some(r.to_string());
                    } else {
                        info!(
                            max_num_seqs = accepted.max_num_seqs,
                            max_batched_tokens = accepted.max_batched_tokens,
                            max_kv_usage = a.body.max_kv_usage,
                            "guard: applied limits to the engine"
                        );
                    }
                }
                Err(e) => shared.admin_failed(&mut st, Call::Limits, e),
            }
        }
        let r = shared.report();
        shared.metrics.record(&r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared::new(&Config {
            engine_url: String::new(),
            engine_admin_url: String::new(),
            interval: Duration::from_millis(250),
            token_file: PathBuf::new(),
            guard: GuardSettings::default(),
            model: ModelConfig::default(),
            guard_config: GuardConfig::default(),
            configured: None,
        })
    }

    #[test]
    fn the_engines_ceiling_caps_the_target_and_the_floor_is_reported_without_one() {
        let shared = shared();
        let mut st = shared.state.lock().unwrap();
        let s = limits_status(&st);
        assert_eq!(
            (s.target, s.min_num_seqs, s.min_batched_tokens),
            (None, 1, 64)
        );
        st.ceiling = Some(Limits::new(32, 2048));
        assert_eq!(
            bounds(&st, Limits::new(64, 1024)).target,
            Limits::new(32, 1024)
        );
        // A floor above the target is capped by it (a target of 0 sequences drains).
        st.target = Some(Limits::new(0, 32));
        let s = limits_status(&st);
        assert_eq!((s.min_num_seqs, s.min_batched_tokens), (0, 32));
    }

    #[test]
    fn the_operator_decides_the_drain_and_a_drain_found_at_start_is_held_as_its() {
        let shared = shared();
        let mut st = shared.state.lock().unwrap();
        let engine = |draining, shutting_down| EngineReading {
            draining: Some(draining),
            shutting_down,
            ..EngineReading::new(EngineFlavor::Redline, 0.0)
        };
        let running = Some(false);
        st.engine = Some(engine(false, running));
        assert_eq!(drain_to_apply(&mut st), None, "nothing said, nothing done");
        st.drain = Some(true);
        assert_eq!(drain_to_apply(&mut st), Some(true));
        st.engine = Some(engine(true, running));
        assert_eq!(drain_to_apply(&mut st), None, "done");
        st.drain = Some(false);
        assert_eq!(drain_to_apply(&mut st), Some(false), "cancelled");
        // Draining on SIGTERM, or an engine that does not say: the pod is ending, not ours
        // to lift, and never taken for the operator's.
        for ending in [Some(true), None] {
            st.engine = Some(engine(true, ending));
            st.drain = Some(false);
            assert_eq!(drain_to_apply(&mut st), None);
            st.drain = None;
            assert_eq!(drain_to_apply(&mut st), None);
            assert!(!limits_status(&st).drain, "not reported as the operator's");
        }
        // A sidecar restarted mid-drain, before the operator speaks: the drain it finds is
        // held and reported, so an operator that no longer wants it sees it and cancels it.
        st.engine = Some(engine(true, running));
        assert_eq!(drain_to_apply(&mut st), None, "already draining");
        assert!(limits_status(&st).drain, "reported");
        st.drain = Some(false);
        assert_eq!(drain_to_apply(&mut st), Some(false), "the cancellation");
        // Once the operator has spoken, its word stands: no drain is taken over again.
        assert_eq!(drain_to_apply(&mut st), Some(false));
        assert!(!limits_status(&st).drain);
    }

    #[test]
    fn the_engines_put_answer_parses_with_and_without_a_ceiling() {
        let a: Applied = serde_json::from_str(
            r#"{"max_num_seqs": 8, "max_batched_tokens": 256, "clamped": true,
                "ceiling": {"max_num_seqs": 8, "max_batched_tokens": 2048}}"#,
        )
        .unwrap();
        assert_eq!(
            (a.limits, a.ceiling),
            (Limits::new(8, 256), Some(Limits::new(8, 2048)))
        );
        let a: Applied =
            serde_json::from_str(r#"{"max_num_seqs": 8, "max_batched_tokens": 256}"#).unwrap();
        assert_eq!(a.ceiling, None);
    }

    #[test]
    fn the_engine_is_held_at_the_guards_redline_for_admission() {
        let shared = shared();
        let mut st = shared.state.lock().unwrap();
        let engine = |line: Option<f64>| {
            Ok(EngineReading {
                limits: Some(Limits::new(8, 256)),
                max_kv_usage: line,
                ..EngineReading::new(EngineFlavor::Redline, 0.1)
            })
        };
        let g = GuardConfig::default();
        // A fresh engine admits to its watermark: the first tick gives it the redline.
        let a = tick_state(&mut st, 0.0, engine(Some(1.0)), g).expect("the line applied");
        assert_eq!(
            (a.body.limits, a.body.max_kv_usage),
            (Limits::new(8, 256), 0.9)
        );
        assert!(a.reason.is_none());
        assert!(tick_state(&mut st, 0.25, engine(Some(0.9)), g).is_none());
        // An engine that exports no line is not told one.
        assert!(tick_state(&mut st, 0.5, engine(None), g).is_none());
        // The guard turned off: the watermark alone again.
        st.settings.enabled = false;
        let a = tick_state(&mut st, 0.75, engine(Some(0.9)), g).expect("the line lifted");
        assert_eq!(a.body.max_kv_usage, 1.0);
    }
}
