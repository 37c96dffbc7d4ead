//! Iteration-level scheduler: continuous batching with chunked prefill.
//!
//! Every step: running sequences first, in the order they were admitted (each decode is one
//! token; an unfinished prefill gets a chunk of what is left of the token budget); then, if
//! nobody was preempted, waiting sequences in arrival order while `max_num_seqs` and the budget
//! allow. When the KV pool cannot grow a running sequence, the last admitted is preempted by recompute:
//! its blocks are freed and it goes back to the waiting queue with its tokens, to be prefilled
//! again (probably from the prefix cache) later. Nothing is ever failed for lack of blocks.
//!
//! Given a time-to-first-token objective, admission is deadline-aware instead of arrival
//! order: the most waiting sequences that can still get their first token within it go first,
//! the others behind them (`redline_api::deadline`, shared with the simulator), judged at
//! the prefill throughput this scheduler measures from the steps it is told about. The clock
//! is the caller's: times come in as seconds.
//!
//! Limits are admission limits: lowering them never evicts a running sequence, it only stops
//! admission until the batch is back under them. Decode tokens of running sequences are never
//! refused for budget: refusing them frees no memory and only stretches latency. So a step
//! holds at most `max(max_batched_tokens, number of running decodes)` tokens.

use crate::kv_cache_manager::{KvCacheManager, SeqId};
use redline_api::deadline::{Deadlines, Waiting};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Live admission limits, changed at run time through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_num_seqs: u32,
    pub max_batched_tokens: u32,
    /// No admission beside running sequences past this share of the KV pool
    /// (`redline_api::admission`); 1.0 leaves only the watermark.
    pub max_kv_usage: f64,
}

impl Limits {
    pub const fn new(max_num_seqs: u32, max_batched_tokens: u32) -> Self {
        Self {
            max_num_seqs,
            max_batched_tokens,
            max_kv_usage: 1.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SeqState {
    /// Prompt followed by every token generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose KV is in the cache.
    pub num_computed: usize,
    /// Arrival order: the waiting queue's.
    pub arrival: u64,
    /// Admission order (the last one, when several): the running list's.
    pub admitted: u64,
    /// Arrival time, seconds on the caller's clock.
    pub arrived_at: f64,
    pub preemptions: u32,
    /// Whether the prompt may start from the prefix cache. Off for a request that wants every
    /// prompt position's logprobs: a cached block was computed for someone else, and its
    /// logits are gone.
    pub reuse_prefix: bool,
}

/// One sequence's share of a step: tokens `start..start + len` go through the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of the known tokens, so its last position yields logits.
    pub sample: bool,
}

#[derive(Debug, Default, Clone)]
pub struct SchedulerOutput {
    pub scheduled: Vec<Scheduled>,
    pub preempted: Vec<SeqId>,
    pub num_tokens: usize,
}

#[derive(Debug)]
pub struct Scheduler {
    kv: KvCacheManager,
    limits: Limits,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    /// In admission order (vLLM v1's): the last admitted is last and is the one preempted
    /// first. Under arrival order admission this is arrival order; with deadlines a late
    /// request admitted after newer ones comes after them, so it is preempted before them and
    /// no decode ever waits behind its prefill.
    running: Vec<SeqId>,
    next_arrival: u64,
    next_admission: u64,
    prompt_tokens_received: u64,
    preemptions_total: u64,
    /// Blocks that left use when finished or aborted sequences gave them back (preemptions'
    /// blocks come back with the sequence: not counted).
    kv_blocks_freed_total: u64,
    prefix_hit_tokens: u64,
    /// Seconds; `None`: arrival order (vLLM's FCFS).
    ttft_objective: Option<f64>,
    /// Tokens per second of well-filled steps, and their duration, smoothed; `None` until one
    /// has run.
    throughput: Option<f64>,
    step_seconds: f64,
}

/// Steps at least this share of the token budget measure the throughput (a step of a few
/// decodes is mostly fixed cost and would make every prefill look slower than it is).
const FULL_STEP: f64 = 0.5;
/// Weight of the newest step in the throughput.
const THROUGHPUT_WEIGHT: f64 = 0.2;

impl Scheduler {
    pub fn new(kv: KvCacheManager, limits: Limits) -> Self {
        Self {
            kv,
            limits,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            next_admission: 0,
            prompt_tokens_received: 0,
            preemptions_total: 0,
            kv_blocks_freed_total: 0,
            prefix_hit_tokens: 0,
            ttft_objective: None,
            throughput: None,
            step_seconds: 0.0,
        }
    }

    /// Deadline-aware admission with this objective (seconds), or arrival order with `None`.
    pub fn set_ttft_objective(&mut self, seconds: Option<f64>) {
        self.ttft_objective = seconds.filter(|s| *s > 0.0);
    }

    pub fn ttft_objective(&self) -> Option<f64> {
        self.ttft_objective
    }

    /// Tokens per second the scheduler judges deadlines by.
    pub fn throughput(&self) -> Option<f64> {
        self.throughput
    }

    /// What a step of `tokens` took; well-filled steps update the throughput estimate.
    pub fn record_step(&mut self, tokens: usize, seconds: f64) {
        let budget = self.limits.max_batched_tokens.max(1) as f64;
        if seconds <= 0.0 || (tokens as f64) < FULL_STEP * budget {
            return;
        }
        let rate = tokens as f64 / seconds;
        (self.throughput, self.step_seconds) = match self.throughput {
            Some(r) => (
                Some(r + THROUGHPUT_WEIGHT * (rate - r)),
                self.step_seconds + THROUGHPUT_WEIGHT * (seconds - self.step_seconds),
            ),
            None => (Some(rate), seconds),
        };
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }
    pub fn limits(&self) -> Limits {
        self.limits
    }
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }
    pub fn preemptions_total(&self) -> u64 {
        self.preemptions_total
    }
    pub fn kv_blocks_freed_total(&self) -> u64 {
        self.kv_blocks_freed_total
    }
    /// Prompt tokens of every sequence ever queued: the demand, counted on arrival.
    pub fn prompt_tokens_received(&self) -> u64 {
        self.prompt_tokens_received
    }
    /// Tokens the waiting sequences will have to compute when admitted (a preempted one
    /// recomputes its whole context): the backlog.
    pub fn waiting_tokens(&self) -> u64 {
        self.waiting
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .map(|s| (s.tokens.len() - s.num_computed) as u64)
            .sum()
    }
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub fn prefix_hit_tokens(&self) -> u64 {
        self.prefix_hit_tokens
    }
    pub fn seq(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }
    pub fn block_table(&self, id: SeqId) -> &[u32] {
        self.kv.block_table(id)
    }

    /// Queues a new sequence arriving at `now` (seconds). The caller has checked it fits the KV
    /// pool on its own.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, now: f64) {
        self.add_with(id, prompt, now, true)
    }

    /// [`Scheduler::add`], computing the whole prompt when `reuse_prefix` is false.
    pub fn add_with(&mut self, id: SeqId, prompt: Vec<u32>, now: f64, reuse_prefix: bool) {
        assert!(!prompt.is_empty(), "empty prompt");
        assert!(!self.seqs.contains_key(&id), "duplicate sequence id");
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.prompt_tokens_received += prompt.len() as u64;
        self.seqs.insert(
            id,
            SeqState {
                prompt_len: prompt.len(),
                tokens: prompt,
                num_computed: 0,
                arrival,
                admitted: 0,
                arrived_at: now,
                preemptions: 0,
                reuse_prefix,
            },
        );
        self.waiting.push_back(id);
    }

    pub fn schedule(&mut self, now: f64) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.limits.max_batched_tokens as usize;

        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let remaining = s.tokens.len() - s.num_computed;
            let is_decode = remaining == 1 && s.num_computed >= s.prompt_len;
            let len = if is_decode { 1 } else { remaining.min(budget) };
            if len == 0 {
                i += 1;
                continue;
            }
            let (start, total) = (s.num_computed, s.num_computed + len);
            let mut scheduled_self = true;
            while !self.kv.allocate(id, total) {
                let victim = *self.running.last().expect("running is not empty");
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    scheduled_self = false;
                    break;
                }
            }
            if !scheduled_self {
                break; // `id` was the newest; everyone after it is gone too
            }
            budget = budget.saturating_sub(len);
            out.num_tokens += len;
            out.scheduled.push(Scheduled {
                seq: id,
                start,
                len,
                sample: total == self.seqs[&id].tokens.len(),
            });
            i += 1;
        }

        if out.preempted.is_empty() {
            self.admit(&mut out, &mut budget, now);
        }
        out
    }

    /// The waiting sequences in the order to admit them.
    fn admission_order(&self, now: f64) -> Vec<SeqId> {
        let Some(objective) = self.ttft_objective else {
            return self.waiting.iter().copied().collect();
        };
        let queued: Vec<Waiting> = self
            .waiting
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                Waiting {
                    arrival: s.arrived_at,
                    prefill_tokens: (s.tokens.len() - s.num_computed) as u64,
                    started: s.tokens.len() > s.prompt_len,
                }
            })
            .collect();
        let ahead = self
            .running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                s.prompt_len.saturating_sub(s.num_computed) as u64
            })
            .sum();
        let d = Deadlines {
            ttft_objective_seconds: objective,
            prefill_tokens_per_second: self.throughput,
            step_seconds: self.step_seconds,
        };
        d.admission_order(&queued, now, ahead)
            .into_iter()
            .map(|i| self.waiting[i])
            .collect()
    }

    fn admit(&mut self, out: &mut SchedulerOutput, budget: &mut usize, now: f64) {
        if self.waiting.is_empty() {
            return;
        }
        let order = self.admission_order(now);
        let mut admitted = Vec::new();
        for id in order {
            if *budget == 0 || self.running.len() >= self.limits.max_num_seqs as usize {
                break;
            }
            let s = &self.seqs[&id];
            let cached = if s.reuse_prefix {
                self.kv.attach_cached_prefix(id, &s.tokens)
            } else {
                0
            };
            let len = (s.tokens.len() - cached).min(*budget);
            let total = cached + len;
            let need_blocks = total.div_ceil(self.kv.block_size()) - self.kv.block_table(id).len();
            let room = redline_api::admission::admits(
                self.kv.num_blocks(),
                self.kv.num_used_blocks(),
                need_blocks,
                !self.running.is_empty(),
                self.limits.max_kv_usage,
            );
            if !room || !self.kv.allocate(id, total) {
                self.kv.free(id); // release the prefix blocks we attached
                break;
            }
            admitted.push(id);
            let s = self.seqs.get_mut(&id).expect("waiting sequence exists");
            s.num_computed = cached;
            self.prefix_hit_tokens += cached as u64;
            let sample = total == s.tokens.len();
            s.admitted = self.next_admission;
            self.next_admission += 1;
            self.running.push(id);
            *budget -= len;
            out.num_tokens += len;
            out.scheduled.push(Scheduled {
                seq: id,
                start: cached,
                len,
                sample,
            });
        }
        if !admitted.is_empty() {
            self.waiting.retain(|w| !admitted.contains(w));
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|r| *r != id);
        self.kv.free(id);
        let s = self.seqs.get_mut(&id).expect("running sequence exists");
        s.num_computed = 0;
        s.preemptions += 1;
        self.preemptions_total += 1;
        // Back into the queue in arrival order, ahead of anyone who came later.
        let arrival = s.arrival;
        let pos = self
            .waiting
            .iter()
            .position(|w| self.seqs[w].arrival > arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, id);
    }

    /// Marks the scheduled chunks as computed; full blocks become shareable prefixes.
    pub fn complete_step(&mut self, out: &SchedulerOutput) {
        for sc in &out.scheduled {
            if let Some(s) = self.seqs.get_mut(&sc.seq) {
                s.num_computed = sc.start + sc.len;
                self.kv.cache_computed(sc.seq, &s.tokens, s.num_computed);
            }
        }
    }

    /// Appends a sampled token; the next step decodes it.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Removes a finished or aborted sequence wherever it is and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<SeqState> {
        let s = self.seqs.remove(&id)?;
        self.running.retain(|r| *r != id);
        self.waiting.retain(|w| *w != id);
        // A block another sequence shares stays in use: count what leaves it.
        let used = self.kv.num_used_blocks();
        self.kv.free(id);
        self.kv_blocks_freed_total += (used - self.kv.num_used_blocks()) as u64;
        Some(s)
    }

    /// Panics when the bookkeeping is inconsistent; run in tests after every step.
    pub fn check_invariants(&self) {
        self.kv.check_invariants();
        assert_eq!(self.running.len() + self.waiting.len(), self.seqs.len());
        for w in &self.waiting {
            assert!(
                !self.running.contains(w),
                "sequence {w} both waiting and running"
            );
            assert!(!self.kv.contains(*w), "waiting sequence {w} holds blocks");
        }
        for pair in self.running.windows(2) {
            assert!(self.seqs[&pair[0]].admitted < self.seqs[&pair[1]].admitted);
        }
        for r in &self.running {
            let s = &self.seqs[r];
            assert!(s.num_computed <= s.tokens.len());
            let bs = self.kv.block_size();
            assert!(self.kv.block_table(*r).len() * bs >= s.num_computed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sched(blocks: usize, seqs: u32, tokens: u32) -> Scheduler {
        Scheduler::new(
            KvCacheManager::new(blocks, 4, true),
            Limits::new(seqs, tokens),
        )
    }

    /// Runs one step with a fake model that samples token 1 for every sampling chunk.
    fn step(s: &mut Scheduler) -> SchedulerOutput {
        step_at(s, 0.0)
    }

    fn step_at(s: &mut Scheduler, now: f64) -> SchedulerOutput {
        let out = s.schedule(now);
        s.complete_step(&out);
        for sc in &out.scheduled {
            if sc.sample {
                s.append_token(sc.seq, 1);
            }
        }
        out
    }

    #[test]
    fn chunked_prefill_under_budget_then_decode() {
        let mut s = sched(64, 4, 8);
        s.add(1, vec![7; 20], 0.0);
        let o = step(&mut s);
        assert_eq!(o.scheduled[0].len, 8);
        assert!(!o.scheduled[0].sample);
        step(&mut s);
        let o = step(&mut s);
        assert_eq!((o.scheduled[0].start, o.scheduled[0].len), (16, 4));
        assert!(o.scheduled[0].sample);
        let o = step(&mut s);
        assert_eq!((o.scheduled[0].start, o.scheduled[0].len), (20, 1));
        s.check_invariants();
    }

    #[test]
    fn demand_is_counted_on_arrival_and_the_backlog_is_what_waits() {
        let mut s = sched(64, 1, 64);
        s.add(1, vec![1; 10], 0.0);
        s.add(2, vec![2; 6], 0.0);
        assert_eq!((s.prompt_tokens_received(), s.waiting_tokens()), (16, 16));
        step(&mut s);
        // Only one sequence may run: the other's prompt is still the backlog.
        assert_eq!((s.prompt_tokens_received(), s.waiting_tokens()), (16, 6));
    }

    #[test]
    fn new_requests_join_between_steps() {
        let mut s = sched(64, 4, 64);
        s.add(1, vec![1; 4], 0.0);
        step(&mut s);
        s.add(2, vec![2; 4], 0.0);
        let o = step(&mut s);
        let ids: Vec<_> = o.scheduled.iter().map(|x| x.seq).collect();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn lowering_max_num_seqs_stops_admission_but_evicts_nobody() {
        let mut s = sched(64, 4, 64);
        for i in 0..3 {
            s.add(i, vec![i as u32; 4], 0.0);
        }
        step(&mut s);
        assert_eq!(s.num_running(), 3);
        s.set_limits(Limits::new(1, 64));
        s.add(9, vec![9; 4], 0.0);
        let o = step(&mut s);
        assert_eq!(o.scheduled.len(), 3);
        assert_eq!(s.num_running(), 3);
        assert_eq!(s.num_waiting(), 1);
        s.remove(0);
        s.remove(1);
        step(&mut s);
        assert_eq!(s.num_waiting(), 1, "still at the limit of 1");
        s.remove(2);
        step(&mut s);
        assert_eq!(s.num_running(), 1);
    }

    #[test]
    fn pool_exhaustion_preempts_the_newest_and_recomputes_it() {
        // 6 blocks of 4 tokens; two sequences of 7 tokens each take 2 blocks, then both grow
        // until the pool runs dry.
        let mut s = sched(6, 4, 64);
        s.add(1, vec![1; 7], 0.0);
        s.add(2, vec![2; 7], 0.0);
        step(&mut s);
        let mut preempted = vec![];
        for _ in 0..6 {
            preempted.extend(step(&mut s).preempted);
            s.check_invariants();
        }
        assert_eq!(preempted.first(), Some(&2));
        assert_eq!(s.seq(2).unwrap().preemptions, 1);
        assert_eq!(
            s.kv_blocks_freed_total(),
            0,
            "a preemption's blocks come back"
        );
        assert!(
            s.seq(1).unwrap().tokens.len() > 9,
            "the oldest kept decoding"
        );
    }

    #[test]
    fn no_admission_beside_others_crosses_the_kv_line() {
        // 10 blocks of 4 tokens at a line of 0.7: an admission may leave at most 6 in use.
        let mut s = sched(10, 8, 64);
        s.set_limits(Limits {
            max_kv_usage: 0.7,
            ..Limits::new(8, 64)
        });
        // A lone prompt of 9 blocks (over the line): admitted, nobody else runs.
        s.add(1, vec![1; 36], 0.0);
        step(&mut s);
        assert_eq!(s.kv().num_used_blocks(), 9);
        s.remove(1);
        // 2 runs (4 blocks, a fifth once it decodes); a prompt of 3 blocks would leave 8: it
        // waits ...
        s.add(2, vec![2; 16], 0.0);
        step(&mut s);
        s.add(3, vec![3; 12], 0.0);
        step(&mut s);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        assert_eq!(s.kv().num_used_blocks(), 5, "2 decoded into a fifth block");
        // ... and is admitted at the watermark alone (1.0: 9 of 10).
        s.set_limits(Limits::new(8, 64));
        step(&mut s);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 0));
        s.check_invariants();
    }

    #[test]
    fn a_sequence_that_needs_every_prompt_position_computes_its_cached_prefix_again() {
        let mut s = sched(64, 4, 64);
        s.add(1, vec![5; 12], 0.0);
        step(&mut s); // three full blocks, cached as a prefix
        s.add_with(2, vec![5; 13], 0.0, false);
        let out = step(&mut s);
        let two = out.scheduled.iter().find(|c| c.seq == 2).unwrap();
        assert_eq!((two.start, two.len), (0, 13), "all of it computed");
        assert_eq!(s.prefix_hit_tokens(), 0);
        s.add(3, vec![5; 13], 0.0);
        let out = step(&mut s);
        let three = out.scheduled.iter().find(|c| c.seq == 3).unwrap();
        assert_eq!(three.start, 12, "the same prompt, reusing the prefix");
        s.check_invariants();
    }

    #[test]
    fn a_finished_sequence_frees_the_blocks_nobody_else_holds() {
        let mut s = sched(64, 4, 64);
        s.add(1, vec![5; 12], 0.0);
        step(&mut s); // three full blocks, cached as a prefix
        let mut prompt = vec![5; 12];
        prompt.push(6);
        s.add(2, prompt, 0.0);
        step(&mut s); // 1 decodes into a fourth block; 2 shares the three and takes its own
        assert_eq!(s.kv().num_used_blocks(), 5);
        s.remove(1);
        assert_eq!(
            s.kv_blocks_freed_total(),
            1,
            "the shared prefix stays in use"
        );
        s.remove(2);
        assert_eq!(s.kv_blocks_freed_total(), 5);
        assert_eq!(s.kv().num_used_blocks(), 0);
    }

    #[test]
    fn with_an_objective_a_request_that_can_make_it_goes_before_a_late_one() {
        let run = |objective: Option<f64>| {
            let mut s = sched(256, 1, 16);
            s.set_ttft_objective(objective);
            // 16 tokens in 0.16 s: 100 tokens/s.
            s.record_step(16, 0.16);
            s.add(1, vec![1; 400], 0.0);
            s.add(2, vec![2; 10], 3.0);
            // At 3.5 s, 1 would get its first token at 7.5 s (deadline 2 s); 2 at 3.6 s (5 s).
            let o = s.schedule(3.5);
            s.check_invariants();
            o.scheduled[0].seq
        };
        assert_eq!(run(Some(2.0)), 2);
        assert_eq!(run(None), 1, "arrival order without an objective");
    }

    #[test]
    fn deadlines_wait_for_a_measured_throughput_from_full_steps() {
        let mut s = sched(256, 1, 16);
        s.set_ttft_objective(Some(2.0));
        // A step of 3 decodes is mostly fixed cost: it says nothing about prefill speed.
        s.record_step(3, 0.1);
        assert_eq!(s.throughput(), None);
        s.add(1, vec![1; 400], 0.0);
        s.add(2, vec![2; 10], 3.0);
        assert_eq!(
            s.schedule(3.5).scheduled[0].seq,
            1,
            "unknown speed: arrival order"
        );
        s.record_step(16, 0.16);
        s.record_step(16, 0.08);
        let r = s.throughput().unwrap();
        assert!((r - 120.0).abs() < 1e-9, "smoothed: {r}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u8),
        Step,
        Finish(u8),
        Limits(u8, u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..30).prop_map(Op::Add),
            Just(Op::Step),
            Just(Op::Step),
            Just(Op::Step),
            any::<u8>().prop_map(Op::Finish),
            (0u8..6, 1u8..40, 1u8..=10).prop_map(|(a, b, c)| Op::Limits(a, b, c)),
        ]
    }

    proptest! {
        /// The scheduler never exceeds its limits or budget, never loses a sequence, and its
        /// block bookkeeping stays exact, whatever the arrivals, finishes and limit changes.
        #[test]
        fn never_exceeds_limits(ops in proptest::collection::vec(op(), 1..300), deadline in any::<bool>()) {
            let mut s = sched(12, 4, 16);
            if deadline {
                // A slow engine and a short objective: most requests go late, the order churns.
                s.set_ttft_objective(Some(0.5));
                s.record_step(16, 1.0);
            }
            let mut now = 0.0;
            let mut next = 0u64;
            let mut live: Vec<SeqId> = vec![];
            for op in ops {
                match op {
                    Op::Add(n) => {
                        // Admission control upstream guarantees a sequence fits the pool alone.
                        let n = (n as usize).min(12 * 4 - 8);
                        next += 1;
                        now += 0.1;
                        s.add(next, vec![(next % 3) as u32; n], now);
                        live.push(next);
                    }
                    Op::Step => {
                        let running_before = s.num_running();
                        let decodes_before: usize = s.running.iter()
                            .filter(|r| { let q = &s.seqs[*r]; q.num_computed + 1 == q.tokens.len() })
                            .count();
                        let lim = s.limits();
                        now += 0.1;
                        let out = step_at(&mut s, now);
                        prop_assert!(out.num_tokens <= (lim.max_batched_tokens as usize).max(decodes_before));
                        prop_assert!(s.num_running() <= running_before.max(lim.max_num_seqs as usize));
                        // Keep sequences bounded so they fit the pool alone.
                        let long: Vec<_> = live.iter().copied()
                            .filter(|id| s.seq(*id).is_some_and(|q| q.tokens.len() >= 40)).collect();
                        for id in long { s.remove(id); live.retain(|x| *x != id); }
                    }
                    Op::Finish(i) if !live.is_empty() => {
                        let id = live.remove(i as usize % live.len());
                        prop_assert!(s.remove(id).is_some());
                    }
                    Op::Limits(a, b, c) => s.set_limits(Limits {
                        max_kv_usage: c as f64 / 10.0,
                        ..Limits::new(a as u32, b as u32)
                    }),
                    _ => {}
                }
                s.check_invariants();
                prop_assert_eq!(s.num_running() + s.num_waiting(), live.len());
            }
            for id in live { s.remove(id); }
            prop_assert_eq!(s.kv().num_free_blocks(), 12);
        }

        /// With room for everyone, every sequence makes progress every few steps: no starvation.
        #[test]
        fn everyone_progresses(lens in proptest::collection::vec(1usize..20, 1..6)) {
            let mut s = sched(64, 8, 32);
            for (i, n) in lens.iter().enumerate() { s.add(i as u64, vec![3; *n], 0.0); }
            for _ in 0..8 { step(&mut s); }
            for (i, n) in lens.iter().enumerate() {
                prop_assert!(s.seq(i as u64).unwrap().tokens.len() > *n);
            }
        }
    }
}
