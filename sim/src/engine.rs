//! One engine replica as a model: vLLM v1's scheduling (FCFS, running sequences first, chunked
//! prefill under a token budget, `max_num_seqs`), a paged KV pool with preemption of the
//! newest sequence by recompute, and a step time from the profile.
//!
//! The engine only plans and applies steps; the fleet's event loop owns the clock.

use std::collections::VecDeque;

use redline_api::deadline::{Deadlines, Waiting};
use redline_api::Limits;

use crate::fleet::Queue;
use crate::profile::EngineProfile;

#[derive(Debug, Clone, PartialEq)]
pub struct Seq {
    /// Index of the request in the trace.
    pub req: usize,
    pub prompt: u32,
    pub output: u32,
    /// Tokens whose KV is computed.
    pub computed: u32,
    pub generated: u32,
    pub blocks: u32,
    /// Seconds on the simulation's clock.
    pub arrival: f64,
}

impl Seq {
    pub fn new(req: usize, prompt: u32, output: u32) -> Self {
        Self {
            req,
            prompt,
            output: output.max(1),
            computed: 0,
            generated: 0,
            blocks: 0,
            arrival: 0.0,
        }
    }
    pub fn arriving(mut self, t: f64) -> Self {
        self.arrival = t;
        self
    }
    /// Tokens known so far (prompt and generated).
    fn len(&self) -> u32 {
        self.prompt + self.generated
    }
}

/// What one step does, planned at its start and applied at its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// (request, tokens computed for it this step).
    pub work: Vec<(usize, u32)>,
    pub seconds: f64,
}

/// What a finished step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepResult {
    /// Requests that got their first token.
    pub first_tokens: Vec<usize>,
    /// Requests that finished (all tokens out).
    pub finished: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Engine {
    block_size: u32,
    total_blocks: u32,
    free_blocks: u32,
    pub limits: Limits,
    /// The share of the pool an admission beside running sequences may fill (the real
    /// engine's `max_kv_usage`, which the sidecar sets to its guard's redline).
    pub max_kv_usage: f64,
    /// Admission order, oldest first.
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    /// Deadline-aware admission (redline's engine) with this TTFT objective; `None`: FCFS.
    pub ttft_objective: Option<f64>,
    pub preemptions_total: u64,
    pub prompt_tokens_received_total: u64,
    pub generation_tokens_total: u64,
    /// First tokens served after the TTFT objective, and all first tokens (the engine's
    /// `requests_late_total` and TTFT histogram count).
    pub requests_late_total: u64,
    pub first_tokens_total: u64,
    /// The inter-token latency histogram's sum and count: a sequence that decodes in a step
    /// waited that step for its token.
    pub inter_token_seconds_total: f64,
    pub inter_tokens_total: u64,
    /// The step histogram's sum and count.
    pub step_seconds_total: f64,
    pub steps_total: u64,
    /// Blocks given back by finished sequences.
    pub kv_blocks_freed_total: u64,
}

impl Engine {
    pub fn new(p: &EngineProfile) -> Self {
        Self {
            block_size: p.block_size,
            total_blocks: p.kv_blocks,
            free_blocks: p.kv_blocks,
            limits: p.limits,
            max_kv_usage: 1.0,
            running: Vec::new(),
            waiting: VecDeque::new(),
            ttft_objective: None,
            preemptions_total: 0,
            prompt_tokens_received_total: 0,
            generation_tokens_total: 0,
            requests_late_total: 0,
            first_tokens_total: 0,
            inter_token_seconds_total: 0.0,
            inter_tokens_total: 0,
            step_seconds_total: 0.0,
            steps_total: 0,
            kv_blocks_freed_total: 0,
        }
    }

    pub fn with_queue(mut self, q: Queue, ttft_objective: f64) -> Self {
        self.ttft_objective = (q == Queue::Deadline).then_some(ttft_objective);
        self
    }

    /// Whether a request can ever fit the pool (else the engine refuses it).
    pub fn fits(&self, prompt: u32, output: u32) -> bool {
        self.blocks_for(prompt + output) <= self.total_blocks
    }

    pub fn add(&mut self, s: Seq) {
        self.prompt_tokens_received_total += s.prompt as u64;
        self.waiting.push_back(s);
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }
    pub fn running(&self) -> usize {
        self.running.len()
    }
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn waiting_tokens(&self) -> u64 {
        self.waiting
            .iter()
            .map(|s| (s.len() - s.computed) as u64)
            .sum()
    }
    pub fn kv_usage(&self) -> f64 {
        1.0 - self.free_blocks as f64 / self.total_blocks.max(1) as f64
    }
    pub fn total_blocks(&self) -> u32 {
        self.total_blocks
    }
    pub fn used_blocks(&self) -> u32 {
        self.total_blocks - self.free_blocks
    }
    /// Every request it holds, running or queued (for a pod killed before it finished).
    pub fn requests(&self) -> impl Iterator<Item = usize> + '_ {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.req)
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `s`'s blocks to hold `tokens`; false if the pool is short.
    fn grow(free: &mut u32, block_size: u32, s: &mut Seq, tokens: u32) -> bool {
        let need = tokens.div_ceil(block_size).saturating_sub(s.blocks);
        if need > *free {
            return false;
        }
        *free -= need;
        s.blocks += need;
        true
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.free_blocks += s.blocks;
        s.blocks = 0;
        s.computed = 0;
        self.preemptions_total += 1;
        // Back in arrival order, as the engine does (under FCFS that is the front: everyone
        // waiting arrived after everyone admitted).
        let pos = self
            .waiting
            .iter()
            .position(|w| w.arrival > s.arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, s);
    }

    /// Indices into the waiting queue (kept in arrival order) in the order to admit them:
    /// arrival order, or with a TTFT objective the deadline order the engine uses
    /// (`redline_api::deadline`), at the throughput the engine measures in full steps.
    fn admission_order(&self, p: &EngineProfile, now: f64) -> Vec<usize> {
        let Some(objective) = self.ttft_objective else {
            return (0..self.waiting.len()).collect();
        };
        let chunk = p.limits.max_batched_tokens;
        let d = Deadlines {
            ttft_objective_seconds: objective,
            prefill_tokens_per_second: Some(p.capacity().prompt_tokens_per_second),
            step_seconds: p.step_seconds(chunk, chunk as u64),
        };
        let queued: Vec<Waiting> = self
            .waiting
            .iter()
            .map(|s| Waiting {
                arrival: s.arrival,
                prefill_tokens: (s.len() - s.computed) as u64,
                started: s.generated > 0,
            })
            .collect();
        let ahead = self
            .running
            .iter()
            .map(|s| s.prompt.saturating_sub(s.computed) as u64)
            .sum();
        d.admission_order(&queued, now, ahead)
    }

    /// Plans the next step (allocating its KV), or `None` with nothing to run.
    pub fn plan(&mut self, p: &EngineProfile, now: f64) -> Option<Step> {
        let mut budget = self.limits.max_batched_tokens;
        let mut work = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = (self.running[i].len() - self.running[i].computed).min(budget);
            let target = self.running[i].computed + n;
            // Short of blocks: preempt the newest running sequence, this one included.
            loop {
                let bs = self.block_size;
                if Self::grow(&mut self.free_blocks, bs, &mut self.running[i], target) {
                    break;
                }
                let last = self.running.len() - 1;
                self.preempt(last);
                if last == i {
                    break;
                }
            }
            if i >= self.running.len() {
                break;
            }
            work.push((i, n));
            budget -= n;
            i += 1;
        }
        let mut admitted = Vec::new();
        for w in self.admission_order(p, now) {
            if budget == 0 || self.running.len() as u32 >= self.limits.max_num_seqs {
                break;
            }
            let mut s = self.waiting[w].clone();
            let n = (s.len() - s.computed).min(budget);
            let target = s.computed + n;
            let need = target.div_ceil(self.block_size).saturating_sub(s.blocks);
            if !redline_api::admission::admits(
                self.total_blocks as usize,
                self.used_blocks() as usize,
                need as usize,
                !self.running.is_empty(),
                self.max_kv_usage,
            ) {
                break;
            }
            if !Self::grow(&mut self.free_blocks, self.block_size, &mut s, target) {
                break;
            }
            admitted.push(w);
            self.running.push(s);
            work.push((self.running.len() - 1, n));
            budget -= n;
        }
        admitted.sort_unstable();
        for w in admitted.into_iter().rev() {
            self.waiting.remove(w);
        }
        if work.is_empty() {
            return None;
        }
        let tokens: u32 = work.iter().map(|w| w.1).sum();
        let context: u64 = work
            .iter()
            .map(|&(i, n)| (self.running[i].computed + n) as u64)
            .sum();
        Some(Step {
            work: work
                .iter()
                .map(|&(i, n)| (self.running[i].req, n))
                .collect(),
            seconds: p.step_seconds(tokens, context),
        })
    }

    /// Applies a planned step: KV computed, a token sampled where a sequence's known tokens
    /// are all computed, finished sequences freed.
    pub fn apply(&mut self, step: &Step) -> StepResult {
        let mut out = StepResult::default();
        self.step_seconds_total += step.seconds;
        self.steps_total += 1;
        for &(req, n) in &step.work {
            // A sequence may have been preempted since (only by a later plan; never here).
            let Some(s) = self.running.iter_mut().find(|s| s.req == req) else {
                continue;
            };
            s.computed += n;
            if s.computed == s.len() {
                s.generated += 1;
                self.generation_tokens_total += 1;
                if s.generated == 1 {
                    out.first_tokens.push(req);
                } else {
                    self.inter_token_seconds_total += step.seconds;
                    self.inter_tokens_total += 1;
                }
            }
        }
        let (mut keep, mut freed) = (Vec::with_capacity(self.running.len()), 0);
        for s in self.running.drain(..) {
            if s.generated >= s.output {
                freed += s.blocks;
                out.finished.push(s.req);
            } else {
                keep.push(s);
            }
        }
        self.running = keep;
        self.free_blocks += freed;
        self.kv_blocks_freed_total += freed as u64;
        debug_assert!(self.free_blocks <= self.total_blocks);
        debug_assert_eq!(
            self.free_blocks + self.running.iter().map(|s| s.blocks).sum::<u32>(),
            self.total_blocks
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn profile(blocks: u32, seqs: u32, tokens: u32) -> EngineProfile {
        EngineProfile {
            kv_blocks: blocks,
            block_size: 4,
            limits: Limits::new(seqs, tokens),
            ..EngineProfile::gpu_8b()
        }
    }

    fn run(e: &mut Engine, p: &EngineProfile) -> (Vec<usize>, Vec<usize>, usize) {
        let (mut first, mut done, mut steps) = (vec![], vec![], 0);
        while let Some(s) = e.plan(p, 0.0) {
            let r = e.apply(&s);
            first.extend(r.first_tokens);
            done.extend(r.finished);
            steps += 1;
            assert!(steps < 100_000);
        }
        (first, done, steps)
    }

    #[test]
    fn chunked_prefill_then_one_token_per_step() {
        let p = profile(100, 4, 8);
        let mut e = Engine::new(&p);
        e.add(Seq::new(0, 20, 3));
        // 20 prompt tokens in chunks of 8: 3 steps, the last samples token 1; then 2 decodes.
        let (first, done, steps) = run(&mut e, &p);
        assert_eq!((first, done, steps), (vec![0], vec![0], 5));
        assert_eq!(e.kv_usage(), 0.0);
        assert_eq!(e.generation_tokens_total, 3);
    }

    #[test]
    fn a_short_pool_preempts_the_newest_and_everything_still_finishes() {
        // 6 blocks of 4 tokens; two requests of 8 + 8 are admitted with 2 blocks each (2 stay
        // free, over the watermark of 1) and need 4 apiece at the end.
        let p = profile(6, 4, 64);
        let mut e = Engine::new(&p);
        e.add(Seq::new(0, 8, 8));
        e.add(Seq::new(1, 8, 8));
        let (_, mut done, _) = run(&mut e, &p);
        done.sort();
        assert_eq!(done, vec![0, 1]);
        assert!(e.preemptions_total > 0);
    }

    #[test]
    fn admission_keeps_one_percent_of_the_pool_free() {
        // 100 blocks of 4 tokens, a watermark of 1: after 50 blocks for the first request,
        // a second of 50 would leave none free and waits; one of 49 is admitted.
        let p = profile(100, 8, 1000);
        let one_step = |prompts: &[u32]| {
            let mut e = Engine::new(&p);
            for (i, &n) in prompts.iter().enumerate() {
                e.add(Seq::new(i, n, 4));
            }
            let s = e.plan(&p, 0.0).unwrap();
            e.apply(&s);
            (e.running(), e.waiting(), e.used_blocks())
        };
        assert_eq!(one_step(&[200, 200]), (1, 1, 50));
        assert_eq!(one_step(&[200, 196]), (2, 0, 99));
        // Alone, a request may fill the pool.
        assert_eq!(one_step(&[400]), (1, 0, 100));
    }

    #[test]
    fn lowering_max_num_seqs_stops_admission_only() {
        let p = profile(100, 4, 64);
        let mut e = Engine::new(&p);
        for i in 0..3 {
            e.add(Seq::new(i, 4, 10));
        }
        let s = e.plan(&p, 0.0).unwrap();
        e.apply(&s);
        assert_eq!(e.running(), 3);
        e.limits.max_num_seqs = 1;
        e.add(Seq::new(3, 4, 10));
        let s = e.plan(&p, 0.0).unwrap();
        e.apply(&s);
        assert_eq!((e.running(), e.waiting()), (3, 1));
    }

    proptest! {
        /// Whatever the pool, limits, KV line and requests: every request finishes (none is
        /// lost to preemption or starved by the line), and the pool is whole again at the end.
        #[test]
        fn every_request_finishes_and_no_block_leaks(
            blocks in 8u32..64,
            seqs in 1u32..8,
            tokens in 1u32..40,
            reqs in prop::collection::vec((1u32..20, 1u32..12), 1..12),
            line in 1u32..=10,
        ) {
            let p = profile(blocks, seqs, tokens);
            let mut e = Engine::new(&p);
            e.max_kv_usage = line as f64 / 10.0;
            let mut n = 0;
            for (i, &(pr, out)) in reqs.iter().enumerate() {
                if e.fits(pr, out) {
                    e.add(Seq::new(i, pr, out));
                    n += 1;
                }
            }
            let (first, done, _) = run(&mut e, &p);
            prop_assert_eq!(done.len(), n);
            prop_assert_eq!(first.len(), n, "one first token per request, even when recomputed");
            prop_assert_eq!(e.used_blocks(), 0);
        }
    }
}
