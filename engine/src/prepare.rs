//! Turning an OpenAI request into the engine's: the body parsed, the model, prompts and
//! parameters checked against what this server and model can do (a 400 naming the
//! parameter), sampling parameters within their ranges, a chat through the model's own
//! template.

use crate::engine::validate;
use crate::openai::*;
use crate::sampling::SamplingParams;
use crate::server::{AppState, Loaded};
use crate::tokenizer::ChatMessage;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::Value;

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
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
pub(crate) struct PromptIn {
    pub(crate) tokens: Vec<u32>,
    pub(crate) max_tokens: usize,
    /// The prompt's text, to answer with in front of the completion (`echo`; completions
    /// only), and with `logprobs` each prompt token's.
    pub(crate) echo: Option<String>,
}

pub(crate) struct Prepared {
    pub(crate) prompts: Vec<PromptIn>,
    /// Choices per prompt (`n`): sequences generated from it.
    pub(crate) n: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) logprobs: Option<usize>,
    pub(crate) stop: Vec<String>,
    pub(crate) ignore_eos: bool,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

/// Checks a request and its prompts (each with its text as given, if any, for `echo`).
pub(crate) fn prepare(
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

/// The prompt of a chat: the messages through the model's own chat template, as tokens.
pub(crate) fn chat_prompt(l: &Loaded, messages: Vec<InMessage>) -> Result<Vec<u32>, ApiError> {
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

/// A 400 naming the first token id past the model's vocabulary, if any.
pub(crate) fn in_vocabulary<'a>(
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
