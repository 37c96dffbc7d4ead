//! HTTP: the OpenAI-compatible API with health, readiness and metrics on the public port, and
//! the admin API (live limits, drain) on a separate listener bound to localhost by default.
//!
//! The listener comes up before the model is loaded, so `/health` answers at once and
//! `/ready` tells the truth while weights load. SIGTERM (or POST /admin/drain) drains: new
//! requests get a retryable 503, `/ready` turns false, accepted requests run to the end; on
//! SIGTERM the process exits when the engine is empty or the grace period is over.

use crate::api_keys::ApiKeys;
use crate::engine::{validate, Request};
use crate::metrics::Metrics;
use crate::openai::*;
use crate::responses::{self, engine_failed, Choice, Shape};
use crate::sampling::SamplingParams;
use crate::scheduler::Limits;
use crate::tokenizer::{ChatMessage, TextCodec};
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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
}

impl AppState {
    pub fn new(model_name: String, metrics: Arc<Metrics>) -> Self {
        Self {
            model_name,
            metrics,
            loaded: OnceLock::new(),
            created: unix_now(),
            shutting_down: AtomicBool::new(false),
        }
    }

    fn draining(&self) -> bool {
        self.loaded
            .get()
            .is_some_and(|l| l.engine.shared.draining.load(Ordering::Relaxed))
    }

    /// SIGTERM: drain for good (the process exits once empty), and say so on /metrics, so a
    /// sidecar tells this drain from one it may lift.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.metrics.shutting_down.set(1);
        self.set_draining(true);
    }

    pub fn set_draining(&self, on: bool) {
        if let Some(l) = self.loaded.get() {
            l.engine.shared.draining.store(on, Ordering::Relaxed);
            self.metrics.draining.set(on as i64);
        }
    }

    fn ready(&self) -> Result<&Loaded, ApiError> {
        let l = self.loaded.get().ok_or_else(|| {
            ApiError::invalid("the model is still loading", None)
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .with_code("model_loading")
        })?;
        if self.draining() {
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

pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/admin/limits", get(get_limits).put(put_limits))
        .route("/admin/drain", post(drain).delete(undrain))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    match st.ready() {
        Ok(_) => Json(json!({"ready": true})).into_response(),
        Err(e) => (e.status, Json(json!({"ready": false, "reason": e.message}))).into_response(),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
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

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        ApiError::invalid(format!("cannot read request body: {}", e.body_text()), None).status(
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                status
            } else {
                StatusCode::BAD_REQUEST
            },
        )
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

/// One prompt of a request (completions take a batch of them).
struct PromptIn {
    tokens: Vec<u32>,
    max_tokens: usize,
    /// The prompt's text, to answer with in front of the completion (`echo`; completions
    /// only), and with `logprobs` each prompt token's.
    echo: Option<String>,
}

struct Prepared {
    prompts: Vec<PromptIn>,
    /// Choices per prompt (`n`): sequences generated from it.
    n: usize,
    sampling: SamplingParams,
    logprobs: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
}

/// Checks a request and its prompts (each with its text as given, if any, for `echo`).
fn prepare(
    st: &AppState,
    l: &Loaded,
    c: Common,
    prompts: Vec<(Vec<u32>, Option<String>)>,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    if let Some(m) = &c.model {
        if *m != st.model_name {
            return Err(ApiError::invalid(
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    st.model_name
                ),
                Some("model"),
            )
            .status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"));
        }
    }
    let n = match c.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES).contains(&n) => n as usize,
        Some(_) => {
            return Err(ApiError::invalid(
                format!("n must be from 1 to {MAX_CHOICES}"),
                Some("n"),
            ))
        }
    };
    let t = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&t) {
        return Err(ApiError::invalid(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p must be in (0, 1]", Some("top_p")));
    }
    if let Some(param) = c.unsupported(kind) {
        return Err(ApiError::invalid(
            format!("`{param}` is not supported by this server"),
            Some(param),
        )
        .with_code("unsupported_parameter"));
    }
    let sampling = sampling_params(&c, t, top_p, l.codec.vocab_size())?;
    let logprobs = logprobs_asked(&c, kind)?;
    if prompts.len() * n > MAX_SEQUENCES {
        return Err(ApiError::invalid(
            format!(
                "{} prompts x n = {n} asks for more than {MAX_SEQUENCES} sequences in one request",
                prompts.len()
            ),
            Some("prompt"),
        ));
    }
    let echo = c.echo == Some(true);
    let capacity = l.engine.shared.envelope.capacity_tokens();
    let asked = c.max_completion_tokens.or(c.max_tokens);
    if asked == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let batch = prompts.len() > 1;
    let mut checked = Vec::with_capacity(prompts.len());
    for (i, (tokens, text)) in prompts.into_iter().enumerate() {
        let room = l.context_length.min(capacity).saturating_sub(tokens.len());
        let max_tokens = match asked {
            Some(n) => n as usize,
            // OpenAI's completions default is 16; chat runs until the model stops or room ends.
            None if kind == Kind::Completion => 16.min(room.max(1)),
            None => room.max(1),
        };
        validate(tokens.len(), max_tokens, l.context_length, capacity).map_err(|e| {
            let code = match e {
                crate::engine::AddError::EmptyPrompt => "empty_prompt",
                _ => "context_length_exceeded",
            };
            let param = if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            };
            let which = if batch {
                format!("prompt {i}: ")
            } else {
                String::new()
            };
            ApiError::invalid(format!("{which}{e}"), Some(param)).with_code(code)
        })?;
        let echo = echo.then(|| text.unwrap_or_else(|| l.codec.decode(&tokens)));
        checked.push(PromptIn {
            tokens,
            max_tokens,
            echo,
        });
    }
    Ok(Prepared {
        prompts: checked,
        n,
        sampling,
        logprobs,
        stop: c.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        ignore_eos: c.ignore_eos,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The most choices one request may ask for (`n`): each is a sequence in the batch, so one
/// request cannot fill a pool by itself.
const MAX_CHOICES: u32 = 16;

/// The most sequences one request may start (its prompts times `n`): lm-evaluation-harness
/// batches up to this many prompts.
const MAX_SEQUENCES: usize = 64;

/// The most alternatives a token's logprobs may list (OpenAI's chat limit; vLLM's default).
const MAX_LOGPROBS: u64 = 20;

/// How many alternatives per token the request wants logprobs for, if it wants them:
/// completions say it in `logprobs` (a count), chat in `logprobs: true` and `top_logprobs`.
fn logprobs_asked(c: &Common, kind: Kind) -> Result<Option<usize>, ApiError> {
    let range = |param| {
        ApiError::invalid(
            format!("{param} must be a whole number from 0 to {MAX_LOGPROBS}"),
            Some(param),
        )
    };
    match kind {
        Kind::Completion => match &c.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(n) if n <= MAX_LOGPROBS => Ok(Some(n as usize)),
                _ => Err(range("logprobs")),
            },
            Some(_) => Err(range("logprobs")),
        },
        Kind::Chat => {
            let on = match &c.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "logprobs must be true or false",
                        Some("logprobs"),
                    ))
                }
            };
            let top = c.top_logprobs.unwrap_or(0) as u64;
            if top > MAX_LOGPROBS {
                return Err(range("top_logprobs"));
            }
            if top > 0 && !on {
                return Err(ApiError::invalid(
                    "top_logprobs needs logprobs: true",
                    Some("top_logprobs"),
                ));
            }
            Ok(on.then_some(top as usize))
        }
    }
}

/// The penalties, cuts and biases of a request, in the ranges OpenAI and vLLM accept.
fn sampling_params(
    c: &Common,
    temperature: f32,
    top_p: f32,
    vocab: usize,
) -> Result<SamplingParams, ApiError> {
    let within = |v: Option<f32>, name: &'static str, lo: f32, hi: f32, default: f32| match v {
        None => Ok(default),
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        Some(_) => Err(ApiError::invalid(
            format!("{name} must be between {lo} and {hi}"),
            Some(name),
        )),
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(_) => {
            return Err(ApiError::invalid(
                "top_k must be at least 1, or -1 or 0 for all tokens",
                Some("top_k"),
            ))
        }
    };
    let repetition_penalty = match c.repetition_penalty {
        None => 1.0,
        Some(r) if r > 0.0 && r.is_finite() => r,
        Some(_) => {
            return Err(ApiError::invalid(
                "repetition_penalty must be greater than 0",
                Some("repetition_penalty"),
            ))
        }
    };
    let mut logit_bias = Vec::new();
    for (id, bias) in c.logit_bias.iter().flatten() {
        let token = id.parse::<u32>().ok().filter(|t| (*t as usize) < vocab);
        match token {
            Some(t) if (-100.0..=100.0).contains(bias) => logit_bias.push((t, *bias)),
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("logit_bias for token {id} must be between -100 and 100"),
                    Some("logit_bias"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("logit_bias key {id:?} is not a token id of this model"),
                    Some("logit_bias"),
                ))
            }
        }
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p: within(c.min_p, "min_p", 0.0, 1.0, 0.0)?,
        presence_penalty: within(c.presence_penalty, "presence_penalty", -2.0, 2.0, 0.0)?,
        frequency_penalty: within(c.frequency_penalty, "frequency_penalty", -2.0, 2.0, 0.0)?,
        repetition_penalty,
        logit_bias,
        seed: c.seed,
    })
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<(Prepared, &Loaded), ApiError> {
        let req: CompletionRequest = parse(body)?;
        let l = st.ready()?;
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
        let l = st.ready()?;
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

/// The prompt of a chat: the messages through the model's own chat template, as tokens.
fn chat_prompt(l: &Loaded, messages: Vec<InMessage>) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                format!("unknown role `{}`", m.role),
                Some("messages"),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join(""),
        };
        let role = if m.role == "developer" {
            "system".into()
        } else {
            m.role
        };
        msgs.push(ChatMessage { role, content });
    }
    let text = l
        .codec
        .apply_chat_template(&msgs)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    l.codec
        .encode(&text)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
}

/// vLLM's `POST /tokenize`: a prompt's (or a chat's, through the template) token ids, so a
/// client can count them against the context before sending.
async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Value, ApiError> {
        let req: TokenizeRequest = parse(body)?;
        let l = st.ready()?;
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
        let l = st.ready()?;
        in_vocabulary(l, &req.tokens, "tokens")?;
        Ok(json!({"prompt": l.codec.decode(&req.tokens)}))
    };
    run().map(Json).into_response()
}

/// A 400 naming the first token id past the model's vocabulary, if any.
fn in_vocabulary<'a>(
    l: &Loaded,
    ids: impl IntoIterator<Item = &'a u32>,
    param: &'static str,
) -> Result<(), ApiError> {
    let vocab = l.codec.vocab_size() as u32;
    match ids.into_iter().find(|t| **t >= vocab) {
        Some(bad) => Err(ApiError::invalid(
            format!("token id {bad} is out of the vocabulary"),
            Some(param),
        )),
        None => Ok(()),
    }
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

async fn get_limits(State(st): State<Arc<AppState>>) -> Response {
    match st.loaded.get() {
        None => ApiError::invalid("the model is still loading", None)
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
        Some(l) => {
            let lim = l.engine.limits();
            let env = l.engine.shared.envelope;
            Json(json!({
                "max_num_seqs": lim.max_num_seqs,
                "max_batched_tokens": lim.max_batched_tokens,
                "max_kv_usage": lim.max_kv_usage,
                "ceiling": {"max_num_seqs": env.max_num_seqs, "max_batched_tokens": env.max_batched_tokens},
                "kv_blocks_total": env.num_blocks,
                "block_size": env.block_size,
                "kv_cache_dtype": env.kv_dtype,
                "draining": st.draining(),
            }))
            .into_response()
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    max_num_seqs: u32,
    max_batched_tokens: u32,
    /// Absent: unchanged.
    #[serde(default)]
    max_kv_usage: Option<f64>,
}

async fn put_limits(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let b: LimitsBody = match parse(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if b.max_batched_tokens == 0 {
        return ApiError::invalid(
            "max_batched_tokens must be at least 1; to stop admission set max_num_seqs to 0 or POST /admin/drain",
            Some("max_batched_tokens"),
        )
        .into_response();
    }
    if b.max_kv_usage
        .is_some_and(|r| !redline_api::admission::valid_kv_share(r))
    {
        return ApiError::invalid(
            "max_kv_usage is the share of the KV pool admission may fill: in (0, 1]",
            Some("max_kv_usage"),
        )
        .into_response();
    }
    let Some(l) = st.loaded.get() else {
        return ApiError::invalid("the model is still loading", None)
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response();
    };
    let want = Limits {
        max_num_seqs: b.max_num_seqs,
        max_batched_tokens: b.max_batched_tokens,
        max_kv_usage: b.max_kv_usage.unwrap_or(l.engine.limits().max_kv_usage),
    };
    match l.engine.set_limits(want) {
        Some(applied) => {
            st.metrics.set_limits(applied);
            let env = l.engine.shared.envelope;
            Json(json!({
                "max_num_seqs": applied.max_num_seqs,
                "max_batched_tokens": applied.max_batched_tokens,
                "max_kv_usage": applied.max_kv_usage,
                "clamped": applied != want,
                "ceiling": {"max_num_seqs": env.max_num_seqs, "max_batched_tokens": env.max_batched_tokens},
            }))
        }
        .into_response(),
        None => engine_failed("the engine stopped".into()).into_response(),
    }
}

async fn drain(State(st): State<Arc<AppState>>) -> Response {
    st.set_draining(true);
    let stats = st
        .loaded
        .get()
        .map(|l| l.engine.stats())
        .unwrap_or_default();
    tracing::info!(
        running = stats.running,
        waiting = stats.waiting,
        "draining: admitting no new requests"
    );
    (
        StatusCode::ACCEPTED,
        Json(json!({"draining": true, "running": stats.running, "waiting": stats.waiting})),
    )
        .into_response()
}

/// Lifts an admin drain. A SIGTERM drain ends the process once empty: requests admitted again
/// would be cut at the grace period's end, so it stays.
async fn undrain(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down.load(Ordering::Relaxed) {
        return ApiError::invalid(
            "shutting down (SIGTERM): the drain ends with the process and cannot be cancelled",
            None,
        )
        .status(StatusCode::CONFLICT)
        .into_response();
    }
    st.set_draining(false);
    tracing::info!("drain cancelled: admitting requests again");
    Json(json!({"draining": false})).into_response()
}

/// Waits until the engine holds no request, or `grace` passes. Returns whether it emptied.
pub async fn wait_until_empty(st: &AppState, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let empty = st.loaded.get().is_none_or(|l| {
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
    /// Seconds a SIGTERM drain may take before the process exits anyway.
    #[arg(long, default_value_t = 30)]
    pub drain_grace_seconds: u64,
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
    let state = Arc::new(AppState::new(name.clone(), metrics.clone()));
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
    let admin_server = axum::serve(admin, admin_router(state.clone()))
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
