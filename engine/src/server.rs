//! HTTP: the OpenAI-compatible API with health, readiness and metrics on the public port
//! (requests checked by `crate::prepare`), and the admin API (`crate::admin`: live limits,
//! drain) on a separate listener bound to localhost by default.
//!
//! The listener comes up before the model is loaded, so `/health` answers at once and
//! `/ready` tells the truth while weights load. SIGTERM (or POST /admin/drain) drains: `/ready`
//! turns false, new requests are still admitted for the lame duck (`crate::drain`), then get a
//! retryable 503; accepted requests run to the end; on SIGTERM the process exits when the
//! engine is empty and the lame duck over, or the grace period is.

use crate::api_keys::ApiKeys;
use crate::drain::{Drain, Phase};
use crate::engine::Request;
use crate::metrics::Metrics;
use crate::openai::*;
use crate::prepare::{chat_prompt, in_vocabulary, parse, prepare, Prepared};
use crate::responses::{self, Choice, Shape};
use crate::scheduler::Limits;
use crate::tokenizer::TextCodec;
use crate::worker::EngineHandle;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What exists once the model is loaded.
pub struct Loaded {
    pub engine: EngineHandle,
    pub codec: TextCodec,
    pub context_length: usize,
}

pub struct AppState {
    pub model_name: String,
    pub metrics: Arc<Metrics>,
    pub loaded: OnceLock<Loaded>,
    pub created: u64,
    /// Set on SIGTERM: the drain that follows ends the process, and no admin call lifts it.
    shutting_down: AtomicBool,
    drain: Mutex<Drain>,
}

impl AppState {
    /// `lame_duck`: how long a drain still admits after `/ready` turns false.
    pub fn new(model_name: String, metrics: Arc<Metrics>, lame_duck: Duration) -> Self {
        Self {
            model_name,
            metrics,
            loaded: OnceLock::new(),
            created: unix_now(),
            shutting_down: AtomicBool::new(false),
            drain: Mutex::new(Drain::new(lame_duck)),
        }
    }

    fn drain_phase(&self) -> Phase {
        self.drain.lock().unwrap().phase(Instant::now())
    }

    /// Not ready: a drain is under way (admitting or not).
    pub(crate) fn draining(&self) -> bool {
        self.drain_phase() != Phase::Serving
    }

    /// SIGTERM: drain for good (the process exits once empty), and say so on /metrics, so a
    /// sidecar tells this drain from one it may lift.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.metrics.shutting_down.set(1);
        self.set_draining(true);
    }

    /// Whether a SIGTERM came: its drain cannot be lifted.
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Starts a drain (one under way keeps its start) or cancels it.
    pub fn set_draining(&self, on: bool) {
        {
            let mut d = self.drain.lock().unwrap();
            if on {
                d.begin(Instant::now());
            } else {
                d.cancel();
            }
        }
        self.metrics.draining.set(on as i64);
    }

    /// How long a drain still admits new requests.
    pub(crate) fn lame_duck_left(&self) -> Duration {
        self.drain.lock().unwrap().lame_duck_left(Instant::now())
    }

    /// `/ready`: loaded and not draining.
    fn serving(&self) -> Result<&Loaded, ApiError> {
        let l = self.loaded()?;
        if self.draining() {
            return Err(ApiError::invalid("this replica is draining", None)
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .with_code("draining"));
        }
        Ok(l)
    }

    fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().ok_or_else(|| {
            ApiError::invalid("the model is still loading", None)
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .with_code("model_loading")
        })
    }

    /// Admission of a new request: loaded, and not a drain past its lame duck.
    pub(crate) fn admit(&self) -> Result<&Loaded, ApiError> {
        let l = self.loaded()?;
        if self.drain_phase() == Phase::Refusing {
            return Err(ApiError::invalid(
                "this replica is draining and admits no new requests; retry on another replica",
                None,
            )
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .with_code("draining"));
        }
        Ok(l)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The public router. With `keys`, the OpenAI API (`/v1/*`) and vLLM's `/tokenize` and
/// `/detokenize` need one of them; health, readiness and metrics never do.
pub fn api_router(
    state: Arc<AppState>,
    max_body_bytes: usize,
    keys: Option<Arc<ApiKeys>>,
) -> Router {
    let mut v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize));
    if let Some(keys) = keys {
        let refused = state.metrics.unauthorized.clone();
        v1 = v1.route_layer(axum::middleware::from_fn_with_state(
            (keys, refused),
            crate::api_keys::require,
        ));
    }
    v1.route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::invalid("no such endpoint", None).status(StatusCode::NOT_FOUND)
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    match st.serving() {
        Ok(_) => Json(json!({"ready": true})).into_response(),
        Err(e) => (e.status, Json(json!({"ready": false, "reason": e.message}))).into_response(),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    // The lame duck ends by time, not by an event: its gauge is set as the page is read
    // (not on every admission, which reads the phase too).
    st.metrics
        .lame_duck
        .set((st.drain_phase() == Phase::LameDuck) as i64);
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.render(),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let max_len = st.loaded.get().map(|l| l.context_length);
    Json(json!({"object": "list", "data": [{
        "id": st.model_name, "object": "model", "created": st.created,
        "owned_by": "redline", "max_model_len": max_len,
    }]}))
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<(Prepared, &Loaded), ApiError> {
        let req: CompletionRequest = parse(body)?;
        let l = st.admit()?;
        let encode = |s: &str| {
            l.codec
                .encode(s)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
        };
        // Each prompt with its text as given, for `echo` (token ids are decoded once checked).
        let prompts: Vec<(Vec<u32>, Option<String>)> = match req.prompt {
            Prompt::Text(s) => vec![(encode(&s)?, Some(s))],
            Prompt::Texts(v) => v
                .into_iter()
                .map(|s| Ok((encode(&s)?, Some(s))))
                .collect::<Result<_, ApiError>>()?,
            Prompt::Tokens(t) => vec![(t, None)],
            Prompt::TokenLists(v) => v.into_iter().map(|t| (t, None)).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid(
                "prompt must not be empty",
                Some("prompt"),
            ));
        }
        in_vocabulary(l, prompts.iter().flat_map(|p| &p.0), "prompt")?;
        let p = prepare(&st, l, req.common, prompts, Kind::Completion)?;
        Ok((p, l))
    };
    match run() {
        Ok((p, l)) => generate(&st, l, p, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<(Prepared, &Loaded), ApiError> {
        let req: ChatRequest = parse(body)?;
        let l = st.admit()?;
        let tokens = chat_prompt(l, req.messages)?;
        Ok((
            prepare(&st, l, req.common, vec![(tokens, None)], Kind::Chat)?,
            l,
        ))
    };
    match run() {
        Ok((p, l)) => generate(&st, l, p, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

/// vLLM's `POST /tokenize`: a prompt's (or a chat's, through the template) token ids, so a
/// client can count them against the context before sending.
async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: TokenizeRequest = parse(body)?;
        let l = st.admit()?;
        let tokens = match (req.prompt, req.messages) {
            (Some(p), None) => l
                .codec
                .encode(&p)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
            (None, Some(m)) => chat_prompt(l, m)?,
            _ => {
                return Err(ApiError::invalid(
                    "give `prompt` or `messages`",
                    Some("prompt"),
                ))
            }
        };
        Ok(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": l.context_length}))
    };
    run().map(Json).into_response()
}

/// vLLM's `POST /detokenize`: token ids back to text.
async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: DetokenizeRequest = parse(body)?;
        let l = st.admit()?;
        in_vocabulary(l, &req.tokens, "tokens")?;
        Ok(json!({"prompt": l.codec.decode(&req.tokens)}))
    };
    run().map(Json).into_response()
}

async fn generate(st: &AppState, l: &Loaded, p: Prepared, kind: Kind) -> Response {
    let arrived = std::time::Instant::now();
    // `n` sequences of each prompt, each its own draw: a seeded request's choices are seeded
    // one after the other, so the whole answer is reproducible. Choice `i * n + j` is prompt
    // `i`'s `j`-th, as OpenAI numbers a batch's choices.
    let mut choices = Vec::with_capacity(p.prompts.len() * p.n);
    for prompt in &p.prompts {
        for j in 0..p.n {
            let mut sampling = p.sampling.clone();
            sampling.seed = p.sampling.seed.map(|s| s.wrapping_add(j as u64));
            let (rx, guard) = l.engine.submit(Request {
                id: 0,
                prompt: prompt.tokens.clone(),
                max_tokens: prompt.max_tokens,
                sampling,
                stop: p.stop.clone(),
                ignore_eos: p.ignore_eos,
                arrived,
                logprobs: p.logprobs,
                prompt_logprobs: prompt.echo.is_some(),
            });
            choices.push(Choice {
                rx,
                guard,
                logprobs: p.logprobs.is_some(),
                echo: prompt.echo.clone(),
                counts_prompt: j == 0,
            });
        }
    }
    let shape = Shape {
        id: format!(
            "{}-{:016x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: unix_now(),
        model: st.model_name.clone(),
        kind,
    };
    if p.stream {
        responses::stream(shape, choices, p.include_usage)
    } else {
        responses::whole(shape, choices).await
    }
}

/// Waits until the engine holds no request, or `grace` passes. Returns whether it emptied.
pub async fn wait_until_empty(st: &AppState, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        // Empty for good only once the lame duck is over: until then a request may still come.
        let empty = st.lame_duck_left().is_zero()
            && st.loaded.get().is_none_or(|l| {
                let s = l.engine.stats();
                s.running == 0 && s.waiting == 0
            });
        if empty {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `redline-engine serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// GGUF model file (Llama architecture). Default: the cached default model, fetched on
    /// first use (SmolLM2-135M-Instruct Q4_1).
    #[arg(long, env = "REDLINE_MODEL")]
    pub model: Option<std::path::PathBuf>,
    /// Name clients use in the `model` field. Default: the file name without `.gguf`.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Address of the OpenAI API, health, readiness and metrics.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address of the admin API (limits, drain). Keep it on localhost: it is unauthenticated.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_host: String,
    #[arg(long, default_value_t = 8001)]
    pub admin_port: u16,
    /// Compute threads (matmuls and attention). Default: all available cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// In-memory weight format, converted at load.
    #[arg(long, value_enum, default_value_t = crate::model::WeightFormat::Q4_1)]
    pub weights: crate::model::WeightFormat,
    /// Tokens per KV block (multiples of 8 take the vector attention kernel).
    #[arg(long, default_value_t = 16, value_parser = block_size)]
    pub block_size: usize,
    /// What the KV cache stores: f16 holds twice the tokens per MiB and reads half the bytes
    /// per step; f32 keeps exactly what the model computed.
    #[arg(long, value_enum, default_value_t = crate::paged_attention::KvDtype::F16)]
    pub kv_cache_dtype: crate::paged_attention::KvDtype,
    /// KV cache pool size in MiB (fixed at start; part of the capacity envelope).
    #[arg(long, default_value_t = 256)]
    pub kv_cache_mib: usize,
    /// KV cache pool size in blocks; overrides --kv-cache-mib.
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Ceiling for max_num_seqs (fixed at start; the live limit moves below it).
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs_ceiling: u32,
    /// Initial live limit on running sequences. Default: the ceiling.
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// Ceiling for max_batched_tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_batched_tokens_ceiling: u32,
    /// Initial live limit on tokens per step (prefill chunk budget).
    #[arg(long, default_value_t = 256)]
    pub max_batched_tokens: u32,
    /// Do not reuse the KV of prompt prefixes shared with earlier requests.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Time-to-first-token objective, ms: the most waiting requests that can still meet it are
    /// admitted first, the others behind them (served once the others are through).
    /// Default: arrival order, as vLLM. The operator sets it from `spec.slo.ttftP99Ms`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttft_objective_ms: Option<u64>,
    /// Seconds a SIGTERM drain may take before the process exits anyway (its lame duck
    /// included).
    #[arg(long, default_value_t = 30)]
    pub drain_grace_seconds: u64,
    /// Seconds a drain (`POST /admin/drain` or SIGTERM) keeps admitting new requests after
    /// `/ready` turns false, so that the Service's endpoints, every node's proxy and any load
    /// balancer have stopped sending before the engine refuses anyone (a pod spec's `preStop`
    /// sleep, built in). A drain already this old when SIGTERM comes refuses at once. The
    /// operator sets it from `spec.lameDuckSeconds`.
    #[arg(long, default_value_t = 0)]
    pub lame_duck_seconds: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Require this key (`Authorization: Bearer <key>`) on the OpenAI API, as vLLM's
    /// `--api-key`. Health, readiness and metrics stay open.
    #[arg(
        long,
        env = "REDLINE_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<String>,
    /// Require one of the keys in this file (one per line), read again when it changes: a
    /// Secret mounted as a volume rotates keys without a restart.
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,
}

fn block_size(s: &str) -> Result<usize, String> {
    let max = crate::paged_attention::MAX_BLOCK_SIZE;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {max}")),
    }
}

/// Binds both listeners, loads the model, serves until SIGTERM/SIGINT, then drains.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    // Before anything else: a key file that cannot be read must not leave the API open.
    let keys = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => Some(ApiKeys::fixed(k)?),
        (None, Some(p)) => Some(ApiKeys::from_file(p)?),
        (None, None) => None,
    }
    .map(Arc::new);
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => crate::fetch::fetch_default_model(&crate::fetch::model_cache_dir(), true)
            .context("fetching the default model")?,
    };
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let metrics = Arc::new(Metrics::new(&name));
    let state = Arc::new(AppState::new(
        name.clone(),
        metrics.clone(),
        Duration::from_secs(args.lame_duck_seconds),
    ));
    let api = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let admin = tokio::net::TcpListener::bind((args.admin_host.as_str(), args.admin_port))
        .await
        .with_context(|| format!("binding admin {}:{}", args.admin_host, args.admin_port))?;
    tracing::info!(
        api = %api.local_addr()?,
        admin = %admin.local_addr()?,
        api_keys = keys.as_ref().map_or(0, |k| k.len()),
        "listening"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let graceful = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api_server = axum::serve(api, api_router(state.clone(), args.max_body_bytes, keys))
        .with_graceful_shutdown(graceful(stop_rx.clone()));
    let api_task = tokio::spawn(async move { api_server.await });
    let admin_server = axum::serve(admin, crate::admin::router(state.clone()))
        .with_graceful_shutdown(graceful(stop_rx.clone()));
    let admin_task = tokio::spawn(async move { admin_server.await });

    let st = state.clone();
    let load = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let t0 = std::time::Instant::now();
        let (model, codec) = crate::engine::load_model(&model_path, args.weights)
            .with_context(|| format!("loading {}", model_path.display()))?;
        let cfg = model.cfg.clone();
        let num_blocks = args.num_blocks.unwrap_or(
            (args.kv_cache_mib << 20)
                / (cfg.kv_bytes_per_token(args.kv_cache_dtype) * args.block_size),
        );
        anyhow::ensure!(
            num_blocks > 0,
            "the KV cache holds no block; raise --kv-cache-mib"
        );
        let envelope = crate::engine::Envelope {
            num_blocks,
            block_size: args.block_size,
            max_num_seqs: args.max_num_seqs_ceiling,
            max_batched_tokens: args.max_batched_tokens_ceiling,
            prefix_caching: !args.no_prefix_caching,
            kv_dtype: args.kv_cache_dtype,
        };
        let limits = Limits::new(
            args.max_num_seqs.unwrap_or(args.max_num_seqs_ceiling),
            args.max_batched_tokens.max(1),
        );
        let mut engine = crate::engine::Engine::new(model, codec.clone(), envelope, limits);
        engine.set_ttft_objective(args.ttft_objective_ms.map(Duration::from_millis));
        let handle = crate::worker::spawn(engine, st.metrics.clone());
        tracing::info!(
            model = %model_path.display(), layers = cfg.n_layer, context = cfg.context_length,
            weights = ?args.weights, kv_dtype = ?args.kv_cache_dtype, kv_blocks = num_blocks, block_size = args.block_size,
            kv_tokens = envelope.capacity_tokens(), ttft_objective_ms = ?args.ttft_objective_ms,
            seconds = t0.elapsed().as_secs_f32(),
            "model loaded"
        );
        let _ = st.loaded.set(Loaded {
            engine: handle,
            codec,
            context_length: cfg.context_length,
        });
        Ok(())
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = load => r??,
        _ = term.recv() => { tracing::info!("SIGTERM while loading; exiting"); return Ok(()); }
        _ = tokio::signal::ctrl_c() => { return Ok(()); }
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
    state.shut_down();
    let left = state.lame_duck_left();
    if !left.is_zero() {
        tracing::info!(
            seconds = left.as_secs_f32(),
            "lame duck: not ready, admitting until the Service has stopped sending"
        );
    }
    let grace = Duration::from_secs(args.drain_grace_seconds);
    if wait_until_empty(&state, grace).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(
            grace_seconds = args.drain_grace_seconds,
            "grace period over with requests still running; exiting"
        );
    }
    let _ = stop_tx.send(true);
    // In-flight responses get a moment to flush; then we go regardless.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = api_task.await;
        let _ = admin_task.await;
    })
    .await;
    Ok(())
}
