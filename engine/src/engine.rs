//! The engine core: scheduler + model runner + per-request generation state, one `step()` at
//! a time. Synchronous and single-owner; `worker` runs it on its own thread behind channels,
//! and the correctness tests drive it directly.

use crate::kv_cache_manager::{KvCacheManager, SeqId};
use crate::model::{Batch, Model};
use crate::paged_attention::{KvDtype, KvStore, TokenCtx};
use crate::sampling::{Sampler, SamplingParams};
use crate::scheduler::{Limits, Scheduler};
use crate::tokenizer::{Detokenizer, TextCodec};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What is fixed at start: the KV pool and the ceilings the live limits move within.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Envelope {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: u32,
    pub max_batched_tokens: u32,
    /// Reuse the KV of full prompt blocks already computed for earlier requests.
    pub prefix_caching: bool,
    /// What the KV pool stores per element.
    pub kv_dtype: KvDtype,
}

impl Envelope {
    pub fn clamp(&self, l: Limits) -> Limits {
        Limits {
            max_num_seqs: l.max_num_seqs.min(self.max_num_seqs),
            max_batched_tokens: l.max_batched_tokens.min(self.max_batched_tokens),
            ..l
        }
    }
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (vLLM's `ignore_eos`;
    /// benchmarks use it to fix output lengths).
    pub ignore_eos: bool,
    /// When the server received it: its TTFT deadline counts from here, not from when the
    /// engine loop next picks it up (up to a step later).
    pub arrived: Instant,
    /// Report each generated token's log-probability and this many likeliest alternatives'.
    pub logprobs: Option<usize>,
    /// With `logprobs`, the same for every prompt token after the first (OpenAI's `echo`):
    /// the whole prompt is computed, none of it taken from the prefix cache.
    pub prompt_logprobs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: SeqId,
    pub token: u32,
    /// Text released by this token (may be empty: held back mid-character or mid-stop-string).
    pub text: String,
    pub finished: Option<FinishReason>,
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    /// The logits the token was sampled from, when `record_logits` is on (tests).
    pub logits: Option<Vec<f32>>,
    /// The token's log-probability, when the request asked for it.
    pub logprobs: Option<Logprob>,
    /// With the first generated token, when the request asked: the prompt's.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// A prompt's tokens with their log-probabilities: the first has none (nothing comes before
/// it), each other one's under the model given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    pub first: String,
    pub rest: Vec<Logprob>,
}

/// A generated token's log-probability and its likeliest alternatives', with each token as
/// its own text (what OpenAI's `logprobs` report).
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Default, Clone)]
pub struct StepOutput {
    pub events: Vec<TokenEvent>,
    pub num_tokens: usize,
    pub preempted: usize,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub kv_blocks_total: usize,
    /// Tokens per KV block: with the block counts, the pool's size in tokens.
    pub kv_block_size: usize,
    pub kv_blocks_used: usize,
    pub running: usize,
    pub waiting: usize,
    pub preemptions_total: u64,
    pub kv_blocks_freed_total: u64,
    pub prefix_hit_tokens: u64,
    pub prompt_tokens_received: u64,
    pub waiting_tokens: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AddError {
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context length of {context} tokens")]
    ContextLength {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds this engine's KV cache of {capacity} tokens")]
    KvCapacity {
        prompt: usize,
        max_tokens: usize,
        capacity: usize,
    },
}

/// Checks a request against the context length and the KV pool, so nothing admitted can be
/// stuck forever for lack of blocks.
pub fn validate(
    prompt_len: usize,
    max_tokens: usize,
    context: usize,
    capacity: usize,
) -> Result<(), AddError> {
    if prompt_len == 0 {
        return Err(AddError::EmptyPrompt);
    }
    if prompt_len + max_tokens > context {
        return Err(AddError::ContextLength {
            prompt: prompt_len,
            max_tokens,
            context,
        });
    }
    if prompt_len + max_tokens > capacity {
        return Err(AddError::KvCapacity {
            prompt: prompt_len,
            max_tokens,
            capacity,
        });
    }
    Ok(())
}

struct Active {
    sampler: Sampler,
    detok: Detokenizer,
    max_tokens: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    /// The prompt tokens' logprobs so far (in order from the second), when asked for: taken
    /// with the first generated token.
    prompt_logprobs: Option<Vec<Logprob>>,
    generated: usize,
    prompt_len: usize,
    /// Text produced but not yet released, held back while it could still begin a stop string.
    pending: String,
}

pub struct Engine {
    model: Model,
    codec: TextCodec,
    kv: KvStore,
    sched: Scheduler,
    envelope: Envelope,
    active: HashMap<SeqId, Active>,
    pub record_logits: bool,
    /// The scheduler's clock starts here.
    epoch: Instant,
}

impl Engine {
    pub fn new(model: Model, codec: TextCodec, envelope: Envelope, limits: Limits) -> Self {
        let c = &model.cfg;
        let kv = KvStore::new(
            c.n_layer,
            envelope.num_blocks,
            envelope.block_size,
            c.n_kv_head,
            c.head_dim,
            envelope.kv_dtype,
        );
        let manager = KvCacheManager::new(
            envelope.num_blocks,
            envelope.block_size,
            envelope.prefix_caching,
        );
        let sched = Scheduler::new(manager, envelope.clamp(limits));
        Self {
            model,
            codec,
            kv,
            sched,
            envelope,
            active: HashMap::new(),
            record_logits: false,
            epoch: Instant::now(),
        }
    }

    /// Admit the requests that can still meet this time-to-first-token first (see
    /// `scheduler`); `None`: arrival order.
    pub fn set_ttft_objective(&mut self, objective: Option<Duration>) {
        self.sched
            .set_ttft_objective(objective.map(|d| d.as_secs_f64()));
    }

    /// The time-to-first-token objective in seconds, if admission is deadline-aware.
    pub fn ttft_objective(&self) -> Option<f64> {
        self.sched.ttft_objective()
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn envelope(&self) -> Envelope {
        self.envelope
    }
    pub fn limits(&self) -> Limits {
        self.sched.limits()
    }
    /// Applies new live limits, clamped into the envelope; returns what was applied.
    pub fn set_limits(&mut self, l: Limits) -> Limits {
        let l = self.envelope.clamp(l);
        self.sched.set_limits(l);
        l
    }
    pub fn is_idle(&self) -> bool {
        self.sched.is_idle()
    }
    pub fn stats(&self) -> Stats {
        Stats {
            kv_blocks_total: self.sched.kv().num_blocks(),
            kv_block_size: self.sched.kv().block_size(),
            kv_blocks_used: self.sched.kv().num_used_blocks(),
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            preemptions_total: self.sched.preemptions_total(),
            kv_blocks_freed_total: self.sched.kv_blocks_freed_total(),
            prefix_hit_tokens: self.sched.prefix_hit_tokens(),
            prompt_tokens_received: self.sched.prompt_tokens_received(),
            waiting_tokens: self.sched.waiting_tokens(),
        }
    }

    pub fn validate(&self, prompt_len: usize, max_tokens: usize) -> Result<(), AddError> {
        validate(
            prompt_len,
            max_tokens,
            self.model.cfg.context_length,
            self.envelope.capacity_tokens(),
        )
    }

    pub fn add(&mut self, r: Request) -> Result<(), AddError> {
        self.validate(r.prompt.len(), r.max_tokens)?;
        let score_prompt = r.prompt_logprobs && r.logprobs.is_some();
        self.active.insert(
            r.id,
            Active {
                sampler: Sampler::new(r.sampling, &r.prompt),
                detok: Detokenizer::default(),
                max_tokens: r.max_tokens,
                stop: r.stop.into_iter().filter(|s| !s.is_empty()).collect(),
                ignore_eos: r.ignore_eos,
                logprobs: r.logprobs,
                prompt_logprobs: score_prompt.then(Vec::new),
                generated: 0,
                prompt_len: r.prompt.len(),
                pending: String::new(),
            },
        );
        let at = r
            .arrived
            .saturating_duration_since(self.epoch)
            .as_secs_f64();
        self.sched.add_with(r.id, r.prompt, at, !score_prompt);
        Ok(())
    }

    /// Drops a request wherever it is and frees its blocks at once.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.active.remove(&id);
        self.sched.remove(id).is_some()
    }

    pub fn step(&mut self) -> Result<StepOutput, crate::model::ModelError> {
        let started = Instant::now();
        let plan = self.sched.schedule(self.now());
        let mut out = StepOutput {
            num_tokens: plan.num_tokens,
            preempted: plan.preempted.len(),
            ..Default::default()
        };
        if plan.scheduled.is_empty() {
            return Ok(out);
        }
        let mut tokens = Vec::with_capacity(plan.num_tokens);
        let mut ctx = Vec::with_capacity(plan.num_tokens);
        let mut logit_rows = Vec::new();
        // What each logits row is for: a prompt token's logprob (the row of the position
        // before it), or the next token's draw.
        enum Row {
            Prompt(SeqId, usize),
            Sample(SeqId),
        }
        let mut uses = Vec::new();
        for sc in &plan.scheduled {
            let seq = self.sched.seq(sc.seq).expect("scheduled sequence exists");
            let table = self.sched.block_table(sc.seq);
            // Prompt logprobs still to record: targets `got + 1 ..` (a recompute after a
            // preemption does not record twice).
            let got = self
                .active
                .get(&sc.seq)
                .and_then(|a| a.prompt_logprobs.as_ref())
                .map(Vec::len);
            for p in sc.start..sc.start + sc.len {
                tokens.push(seq.tokens[p]);
                ctx.push(TokenCtx { pos: p, table });
                if got.is_some_and(|got| p + 1 < seq.prompt_len && p + 1 > got) {
                    logit_rows.push(tokens.len() - 1);
                    uses.push(Row::Prompt(sc.seq, p + 1));
                }
            }
            if sc.sample {
                logit_rows.push(tokens.len() - 1);
                uses.push(Row::Sample(sc.seq));
            }
        }
        let logits = self.model.forward(
            &mut self.kv,
            &Batch {
                tokens: &tokens,
                ctx: &ctx,
                logit_rows: &logit_rows,
            },
        )?;
        self.sched.complete_step(&plan);
        self.sched
            .record_step(plan.num_tokens, started.elapsed().as_secs_f64());
        for (row, used) in logits.into_iter().zip(uses) {
            match used {
                Row::Prompt(id, target) => {
                    let token = self.sched.seq(id).expect("scheduled").tokens[target];
                    let codec = &self.codec;
                    if let Some(a) = self.active.get_mut(&id) {
                        if let (Some(n), Some(got)) = (a.logprobs, a.prompt_logprobs.as_mut()) {
                            got.push(logprob_of(codec, &row, token, n));
                        }
                    }
                }
                Row::Sample(id) => {
                    if let Some(ev) = self.sample_one(id, row) {
                        out.events.push(ev);
                    }
                }
            }
        }
        Ok(out)
    }

    fn sample_one(&mut self, id: SeqId, logits: Vec<f32>) -> Option<TokenEvent> {
        let a = self.active.get_mut(&id)?;
        let token = a.sampler.sample(&logits);
        let logprobs = a
            .logprobs
            .map(|n| logprob_of(&self.codec, &logits, token, n));
        let (sched, codec) = (&self.sched, &self.codec);
        let prompt_logprobs = a.prompt_logprobs.take().map(|rest| PromptLogprobs {
            first: codec.decode(&[sched.seq(id).expect("active sequence").tokens[0]]),
            rest,
        });
        a.generated += 1;
        let mut finished = None;
        if !a.ignore_eos && self.codec.stop_ids().contains(&token) {
            finished = Some(FinishReason::Stop);
        } else if let Some(piece) = a.detok.push(&self.codec, token) {
            a.pending.push_str(&piece);
        }
        if finished.is_none() {
            if let Some(cut) = a
                .stop
                .iter()
                .filter_map(|s| a.pending.find(s.as_str()))
                .min()
            {
                a.pending.truncate(cut);
                finished = Some(FinishReason::Stop);
            } else if a.generated >= a.max_tokens {
                finished = Some(FinishReason::Length);
            }
        }
        let text = if finished.is_some() {
            std::mem::take(&mut a.pending)
        } else {
            // Release all but the longest suffix that could still start a stop string.
            let hold = a
                .stop
                .iter()
                .map(|s| longest_prefix_suffix(&a.pending, s))
                .max()
                .unwrap_or(0);
            let release = a.pending.len() - hold;
            a.pending.drain(..release).collect()
        };
        let ev = TokenEvent {
            id,
            token,
            text,
            finished,
            completion_tokens: a.generated,
            prompt_tokens: a.prompt_len,
            logits: self.record_logits.then_some(logits),
            logprobs,
            prompt_logprobs,
        };
        if finished.is_some() {
            self.active.remove(&id);
            self.sched.remove(id);
        } else {
            self.sched.append_token(id, token);
        }
        Some(ev)
    }
}

/// `token`'s logprob under `logits` with the `n` likeliest alternatives', as texts.
fn logprob_of(codec: &TextCodec, logits: &[f32], token: u32, n: usize) -> Logprob {
    let lp = crate::sampling::logprobs(logits, token, n);
    Logprob {
        token: codec.decode(&[lp.token]),
        logprob: lp.logprob,
        top: lp
            .top
            .into_iter()
            .map(|(t, l)| (codec.decode(&[t]), l))
            .collect(),
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| {
            n <= text.len()
                && stop.is_char_boundary(n)
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::longest_prefix_suffix;

    #[test]
    fn holds_back_only_what_could_start_a_stop_string() {
        assert_eq!(longest_prefix_suffix("hello wor", "world"), 3);
        assert_eq!(longest_prefix_suffix("hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("ab\n", "\n\n"), 1);
        assert_eq!(longest_prefix_suffix("é", "éa"), 2);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Text(#[from] crate::tokenizer::TextError),
}

/// Reads a GGUF file into a model and its tokenizer/chat template.
pub fn load_model(
    path: &std::path::Path,
    format: crate::model::WeightFormat,
) -> Result<(Model, TextCodec), LoadError> {
    let (ct, mut file) = crate::model::read_gguf(path)?;
    let codec = TextCodec::from_gguf(&ct)?;
    let model = Model::load(&ct, &mut file, format)?;
    Ok((model, codec))
}
