//! OpenAI wire types: what clients send and what we answer, including the error shape
//! (`{"error": {"message", "type", "param", "code"}}`) every 4xx/5xx uses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn status(mut self, s: StatusCode) -> Self {
        self.status = s;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

/// A string or a list of strings (`stop`, single-prompt arrays).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share. Unknown fields are ignored, as OpenAI's SDKs send many.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// vLLM extension: generate exactly `max_tokens`, ignoring end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's form) to a bias from -100 to 100.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// vLLM extensions.
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Completions: how many alternatives per token (0: the sampled token's only); chat: a
    /// bool, with the count in `top_logprobs`. As JSON: the endpoints give it two types.
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<u32>,
    /// Completions: answer with the prompt in front (and with `logprobs`, its tokens').
    pub echo: Option<bool>,
    /// Asked for and not served here: refused with a clear error rather than ignored
    /// (`unsupported`).
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub response_format: Option<serde_json::Value>,
}

/// Which endpoint a request came to: they share `Common` and shape their answers apart.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Completion,
    Chat,
}

impl Common {
    /// The first parameter this server does not serve to `kind` that the request asks for, if
    /// any. Ignoring it would answer something other than what was asked: text where JSON or a
    /// tool call was required, no echo where one was.
    pub fn unsupported(&self, kind: Kind) -> Option<&'static str> {
        use serde_json::Value;
        if kind == Kind::Chat && self.echo == Some(true) {
            return Some("echo");
        }
        if self.best_of.is_some_and(|n| n > 1) {
            return Some("best_of");
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Some("suffix");
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Some("tools");
        }
        match &self.response_format {
            None | Some(Value::Null) => None,
            Some(f) if f["type"] == "text" => None,
            Some(_) => Some("response_format"),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// vLLM's `/tokenize` body: a prompt or chat messages (`model` is accepted and ignored).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<InMessage>>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<InMessage>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}
