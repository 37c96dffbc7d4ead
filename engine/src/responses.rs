//! OpenAI response bodies for one request's choices (`n` engine sequences for each of its
//! prompts): the whole answer, or an SSE stream of chunks, each carrying one choice's new text (and its
//! tokens' logprobs), the finish reasons, an optional usage chunk, then `data: [DONE]`.
//!
//! Each choice owns its sequence's abort guard: a client that goes away drops the response,
//! which aborts every choice still running and frees their KV blocks at once.

use crate::engine::{FinishReason, Logprob, PromptLogprobs};
use crate::openai::{ApiError, Kind, Usage};
use crate::worker::{AbortOnDrop, Event};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use tokio::sync::mpsc::UnboundedReceiver;

/// Identity and shape of one response, shared by its chunks.
pub struct Shape {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
}

/// One choice: an engine sequence's events, its abort guard, whether its tokens' logprobs
/// were asked for, the prompt to answer with in front (`echo`), and whether its prompt counts
/// in the usage (the first of its prompt's `n`: OpenAI counts each prompt once).
pub struct Choice {
    pub rx: UnboundedReceiver<Event>,
    pub guard: AbortOnDrop,
    pub logprobs: bool,
    pub echo: Option<String>,
    pub counts_prompt: bool,
}

/// A stream chunk's choice object: the new text (in chat's `delta`, with the role on a
/// choice's first).
fn choice_delta(
    kind: Kind,
    index: usize,
    text: &str,
    finish: Option<&str>,
    first: bool,
    logprobs: Value,
) -> Value {
    match kind {
        Kind::Completion => json!({"index": index, "text": text, "logprobs": logprobs,
                                   "finish_reason": finish}),
        Kind::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({"index": index, "delta": delta, "logprobs": logprobs,
                   "finish_reason": finish})
        }
    }
}

impl Shape {
    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
               "model": self.model, "choices": choices})
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// OpenAI's `logprobs` of a choice for these tokens: an echoed prompt's (its first token has
/// none: `null` in the lists) then the generated ones; completions' four parallel lists (each
/// token's text offset counted on from `offset`, which moves past them), chat's `content`.
/// `Null` when the request did not ask (`generated` is `None`).
fn logprobs_json(
    kind: Kind,
    prompt: Option<&PromptLogprobs>,
    generated: Option<&[Logprob]>,
    offset: &mut usize,
) -> Value {
    let Some(generated) = generated else {
        return Value::Null;
    };
    let entries = prompt.iter().flat_map(|p| &p.rest).chain(generated);
    match kind {
        Kind::Completion => {
            let (mut tokens, mut scores, mut top, mut offsets) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            if let Some(p) = prompt {
                tokens.push(json!(p.first));
                scores.push(Value::Null);
                top.push(Value::Null);
                offsets.push(*offset);
                *offset += p.first.chars().count();
            }
            for e in entries {
                tokens.push(json!(e.token));
                scores.push(json!(e.logprob));
                // The sampled token is always there: up to `logprobs + 1` entries.
                let mut m = serde_json::Map::new();
                for (t, l) in &e.top {
                    m.insert(t.clone(), json!(l));
                }
                m.entry(e.token.clone()).or_insert(json!(e.logprob));
                top.push(Value::Object(m));
                offsets.push(*offset);
                *offset += e.token.chars().count();
            }
            json!({"tokens": tokens, "token_logprobs": scores, "top_logprobs": top,
                   "text_offset": offsets})
        }
        Kind::Chat => {
            let one = |t: &str, l: f32| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
            let content: Vec<Value> = entries
                .map(|e| {
                    let mut v = one(&e.token, e.logprob);
                    v["top_logprobs"] = e.top.iter().map(|(t, l)| one(t, *l)).collect();
                    v
                })
                .collect();
            json!({ "content": content })
        }
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

pub fn engine_failed(msg: String) -> ApiError {
    tracing::error!(error = %msg, "request failed in the engine");
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("the engine failed: {msg}"),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// One choice run to its end: text, finish reason, prompt and completion tokens, logprobs.
struct Finished {
    text: String,
    finish: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    logprobs: Option<Vec<Logprob>>,
    echo: Option<String>,
    prompt: Option<PromptLogprobs>,
    counts_prompt: bool,
}

async fn collect(mut c: Choice) -> Result<Finished, ApiError> {
    let mut text = String::new();
    let mut logprobs = c.logprobs.then(Vec::new);
    let mut prompt = None;
    while let Some(ev) = c.rx.recv().await {
        match ev {
            Event::Token(t) => {
                text.push_str(&t.text);
                prompt = prompt.or(t.prompt_logprobs);
                if let (Some(all), Some(lp)) = (logprobs.as_mut(), t.logprobs) {
                    all.push(lp);
                }
                if let Some(r) = t.finished {
                    c.guard.disarm();
                    return Ok(Finished {
                        text,
                        finish: finish_str(r),
                        prompt_tokens: t.prompt_tokens,
                        completion_tokens: t.completion_tokens,
                        logprobs,
                        echo: c.echo,
                        prompt,
                        counts_prompt: c.counts_prompt,
                    });
                }
            }
            Event::Failed(msg) => {
                c.guard.disarm();
                return Err(engine_failed(msg));
            }
        }
    }
    Err(engine_failed("the engine stopped".into()))
}

/// The whole answer: every choice run to its end (concurrently, in one batch), usage with
/// each prompt counted once and the completions summed, as OpenAI counts `n`.
pub async fn whole(shape: Shape, choices: Vec<Choice>) -> Response {
    let done = futures::future::join_all(choices.into_iter().map(collect)).await;
    let mut out = Vec::with_capacity(done.len());
    let (mut prompt, mut completion) = (0, 0);
    for (index, d) in done.into_iter().enumerate() {
        let d = match d {
            Ok(d) => d,
            Err(e) => return e.into_response(),
        };
        if d.counts_prompt {
            prompt += d.prompt_tokens;
        }
        completion += d.completion_tokens;
        // An echoed prompt comes first, in the text and the logprobs.
        let logprobs = logprobs_json(shape.kind, d.prompt.as_ref(), d.logprobs.as_deref(), &mut 0);
        let text = d.echo.unwrap_or_default() + &d.text;
        out.push(match shape.kind {
            Kind::Completion => json!({"index": index, "text": text, "logprobs": logprobs,
                                       "finish_reason": d.finish}),
            Kind::Chat => json!({"index": index,
                                 "message": {"role": "assistant", "content": text},
                                 "logprobs": logprobs, "finish_reason": d.finish}),
        });
    }
    let mut body = shape.envelope(false, out);
    body["usage"] = json!(Usage::new(prompt, completion));
    Json(body).into_response()
}

/// What one choice's stream yields.
enum Item {
    /// A choice object for a chunk.
    Delta(Value),
    /// The choice finished (its finish reason went out in the last `Delta`).
    Done {
        prompt: usize,
        completion: usize,
    },
    Failed(String),
}

/// One choice's items: a delta per released text piece (with the logprobs of every token
/// since the previous delta: a token whose text is held back, mid-character or
/// mid-stop-string, goes with the next), the finish reason on the last, then `Done`.
fn choice_items(kind: Kind, index: usize, c: Choice) -> impl Stream<Item = Item> {
    struct S {
        c: Choice,
        kind: Kind,
        index: usize,
        first: bool,
        pending: Option<Vec<Logprob>>,
        /// An echoed prompt's logprobs, for the first delta.
        prompt: Option<PromptLogprobs>,
        offset: usize,
        tail: Vec<Item>,
        over: bool,
    }
    impl S {
        fn delta(&mut self, text: &str, finish: Option<&str>) -> Item {
            let pending = self.pending.as_mut().map(std::mem::take);
            let prompt = self.prompt.take();
            let lp = logprobs_json(
                self.kind,
                prompt.as_ref(),
                pending.as_deref(),
                &mut self.offset,
            );
            // The echoed prompt goes out in front of the first piece.
            let text = match self.c.echo.take() {
                Some(echo) => echo + text,
                None => text.to_string(),
            };
            let d = choice_delta(self.kind, self.index, &text, finish, self.first, lp);
            self.first = false;
            Item::Delta(d)
        }
    }
    let pending = c.logprobs.then(Vec::new);
    let init = S {
        c,
        kind,
        index,
        first: true,
        pending,
        prompt: None,
        offset: 0,
        tail: Vec::new(),
        over: false,
    };
    futures::stream::unfold(init, |mut s| async move {
        loop {
            if let Some(item) = s.tail.pop() {
                return Some((item, s));
            }
            if s.over {
                return None;
            }
            match s.c.rx.recv().await {
                Some(Event::Token(t)) => {
                    if t.prompt_logprobs.is_some() {
                        s.prompt = t.prompt_logprobs;
                    }
                    if let (Some(p), Some(lp)) = (s.pending.as_mut(), t.logprobs) {
                        p.push(lp);
                    }
                    if let Some(r) = t.finished {
                        s.c.guard.disarm();
                        s.over = true;
                        s.tail.push(Item::Done {
                            prompt: if s.c.counts_prompt {
                                t.prompt_tokens
                            } else {
                                0
                            },
                            completion: t.completion_tokens,
                        });
                        let last = s.delta(&t.text, Some(finish_str(r)));
                        return Some((last, s));
                    } else if !t.text.is_empty() || s.first {
                        let d = s.delta(&t.text, None);
                        return Some((d, s));
                    }
                }
                Some(Event::Failed(msg)) => {
                    s.c.guard.disarm();
                    s.over = true;
                    return Some((Item::Failed(msg), s));
                }
                None => {
                    s.over = true;
                    return Some((Item::Failed("the engine stopped".into()), s));
                }
            }
        }
    })
}

/// The SSE stream of every choice's chunks as they come, the usage chunk once all have
/// finished (each prompt counted once, completions summed), then `[DONE]`. A choice the engine
/// fails ends the stream with an error event; dropping the stream aborts the rest.
pub fn stream(shape: Shape, choices: Vec<Choice>, include_usage: bool) -> Response {
    let n = choices.len();
    let merged = futures::stream::select_all(
        choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| Box::pin(choice_items(shape.kind, i, c))),
    );
    struct S<M> {
        merged: M,
        shape: Shape,
        left: usize,
        prompt: usize,
        completion: usize,
        include_usage: bool,
        tail: Vec<SseEvent>,
        over: bool,
    }
    let init = S {
        merged,
        shape,
        left: n,
        prompt: 0,
        completion: 0,
        include_usage,
        tail: Vec::new(),
        over: false,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let events = futures::stream::unfold(init, move |mut s| async move {
        loop {
            if let Some(ev) = s.tail.pop() {
                return Some((Ok::<_, Infallible>(ev), s));
            }
            if s.over {
                return None;
            }
            match s.merged.next().await {
                Some(Item::Delta(choice)) => {
                    let chunk = data(s.shape.envelope(true, vec![choice]));
                    return Some((Ok(chunk), s));
                }
                Some(Item::Done { prompt, completion }) => {
                    s.prompt += prompt;
                    s.completion += completion;
                    s.left -= 1;
                    if s.left == 0 {
                        s.over = true;
                        // `tail` pops from the end: push in reverse order.
                        s.tail.push(SseEvent::default().data("[DONE]"));
                        if s.include_usage {
                            let mut u = s.shape.envelope(true, vec![]);
                            u["usage"] = json!(Usage::new(s.prompt, s.completion));
                            s.tail.push(data(u));
                        }
                    }
                }
                Some(Item::Failed(msg)) => {
                    s.over = true;
                    let e = engine_failed(msg);
                    s.tail.push(SseEvent::default().data("[DONE]"));
                    s.tail.push(data(
                        json!({"error": {"message": e.message, "type": e.kind}}),
                    ));
                }
                None => return None,
            }
        }
    });
    Sse::new(events).into_response()
}
