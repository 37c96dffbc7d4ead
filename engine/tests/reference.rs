//! Correctness of the paged, continuously batched path against a one-sequence-at-a-time
//! reference over the same GGUF: candle's `quantized_llama` with its contiguous KV cache,
//! fed one position at a time. At every generated step the engine's logits must match the
//! reference's within a tolerance, and greedy tokens must agree except at near-ties, which
//! the test detects and reports. Run with the real default model.

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use redline_engine::engine::{load_model, Engine, Envelope, Request};
use redline_engine::model::WeightFormat;
use redline_engine::paged_attention::KvDtype;
use redline_engine::sampling::SamplingParams;
use redline_engine::scheduler::Limits;
use redline_engine::tokenizer::ChatMessage;
use std::collections::HashMap;

const GEN: usize = 20;
/// Largest |engine - reference| allowed for any logit, relative to the reference's spread
/// (max - min over the vocabulary). f32: the same weights, only summation order differs.
const F32_TOL: f32 = 1e-3;
/// f32 weights with the f16 KV cache: every key and value rounded to 11 significant bits.
const F16_KV_TOL: f32 = 1e-2;
/// Q8_0 / auto: weights re-quantized at load (or 4-bit as in the file) and activations
/// quantized to 8 bits in the matmuls.
const Q8_TOL: f32 = 0.1;

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash map is in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a name for a pet turtle.",
    "What is 12 times 12?",
];

struct Reference {
    model: ModelWeights,
    /// Per prompt: the token path fed so far and the logits after each of its positions.
    memo: HashMap<usize, (Vec<u32>, Vec<Vec<f32>>)>,
}

impl Reference {
    fn new() -> Self {
        let path = common::model_path();
        // The reference runs the file's weights dequantized to f32 with f32 activations:
        // exactly the weights of our f32 format, so any difference is our arithmetic.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let model = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
        Self {
            model,
            memo: HashMap::new(),
        }
    }

    /// Logits after every position of `path` (prompt then generated tokens), one at a time.
    fn logits(&mut self, key: usize, path: &[u32]) -> Vec<Vec<f32>> {
        if let Some((p, l)) = self.memo.get(&key) {
            if p.starts_with(path) {
                return l[..path.len()].to_vec();
            }
        }
        self.model.clear_kv_cache();
        let mut out = Vec::with_capacity(path.len());
        for (pos, &t) in path.iter().enumerate() {
            let x = Tensor::new(&[t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let l = self.model.forward(&x, pos).unwrap();
            out.push(l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        }
        self.memo.insert(key, (path.to_vec(), out.clone()));
        out
    }
}

struct Outcome {
    worst_rel: f32,
    near_ties: Vec<String>,
    preemptions: u64,
    prefix_hits: u64,
}

/// Runs all prompts concurrently through the engine and compares every step with the reference.
/// `key` numbers the prompts for the reference's memo.
fn run(
    engine: &mut Engine,
    reference: &mut Reference,
    prompts: &[Vec<u32>],
    key: usize,
) -> Outcome {
    engine.record_logits = true;
    for (i, p) in prompts.iter().enumerate() {
        engine
            .add(Request {
                id: i as u64,
                prompt: p.clone(),
                max_tokens: GEN,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                stop: vec![],
                // Fixed lengths, so the small pool really runs dry.
                ignore_eos: true,
                arrived: std::time::Instant::now(),
                logprobs: None,
                prompt_logprobs: false,
            })
            .unwrap();
    }
    let mut got: HashMap<u64, Vec<(u32, Vec<f32>)>> = HashMap::new();
    let mut steps = 0;
    while !engine.is_idle() {
        steps += 1;
        assert!(steps < 10_000, "engine made no progress");
        for ev in engine.step().unwrap().events {
            got.entry(ev.id)
                .or_default()
                .push((ev.token, ev.logits.unwrap()));
        }
    }
    let mut worst_rel = 0.0f32;
    let mut near_ties = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let steps = &got[&(i as u64)];
        let mut path = p.clone();
        path.extend(steps.iter().map(|s| s.0));
        // Logits that chose generated token k were produced at position prompt_len - 1 + k.
        let reference_logits = reference.logits(key + i, &path[..path.len() - 1]);
        for (k, (token, logits)) in steps.iter().enumerate() {
            let r = &reference_logits[p.len() - 1 + k];
            let spread = r.iter().cloned().fold(f32::MIN, f32::max)
                - r.iter().cloned().fold(f32::MAX, f32::min);
            let diff = logits
                .iter()
                .zip(r)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            worst_rel = worst_rel.max(diff / spread);
            let ref_best = redline_engine::sampling::argmax(r);
            if ref_best != *token {
                // With every logit off by at most `diff`, two logits can swap order only if
                // the reference put them within 2 * diff of each other: a near-tie.
                let gap = r[ref_best as usize] - r[*token as usize];
                assert!(
                    gap <= 2.0 * diff + 1e-4,
                    "prompt {i} step {k}: engine chose {token}, reference {ref_best}; gap {gap} \
                     exceeds twice the logit error {diff}: not a near-tie"
                );
                near_ties.push(format!(
                    "prompt {i} step {k}: {token} vs {ref_best} (gap {gap:.4} <= 2 x {diff:.4})"
                ));
            }
        }
    }
    let stats = engine.stats();
    assert_eq!(
        stats.kv_blocks_used, 0,
        "blocks leaked after all requests finished"
    );
    Outcome {
        worst_rel,
        near_ties,
        preemptions: stats.preemptions_total,
        prefix_hits: stats.prefix_hit_tokens,
    }
}

fn prompts(engine: &Engine, shared_system: bool) -> Vec<Vec<u32>> {
    QUESTIONS
        .iter()
        .map(|q| {
            let mut msgs = vec![];
            if shared_system {
                msgs.push(ChatMessage {
                    role: "system".into(),
                    content: "You are a concise assistant. Answer in one short sentence, plainly, \
                              without lists or markdown, and never ask follow-up questions."
                        .into(),
                });
            }
            msgs.push(ChatMessage {
                role: "user".into(),
                content: q.to_string(),
            });
            let text = engine.codec().apply_chat_template(&msgs).unwrap();
            engine.codec().encode(&text).unwrap()
        })
        .collect()
}

fn engine(
    format: WeightFormat,
    kv_dtype: KvDtype,
    num_blocks: usize,
    block_size: usize,
    prefix_caching: bool,
) -> Engine {
    let (model, codec) = load_model(&common::model_path(), format).unwrap();
    let env = Envelope {
        num_blocks,
        block_size,
        max_num_seqs: 16,
        max_batched_tokens: 256,
        prefix_caching,
        kv_dtype,
    };
    Engine::new(model, codec, env, Limits::new(16, 64))
}

fn report(name: &str, o: &Outcome, tol: f32) {
    eprintln!(
        "{name}: worst |engine-ref|/spread = {:.5}, preemptions = {}, prefix-hit tokens = {}, near-ties = {:?}",
        o.worst_rel, o.preemptions, o.prefix_hits, o.near_ties
    );
    assert!(
        o.worst_rel < tol,
        "{name}: logits differ from the reference by {} of their spread",
        o.worst_rel
    );
}

#[test]
fn batched_paged_logits_match_one_at_a_time_reference() {
    let mut reference = Reference::new();

    // 1. Ample KV pool, no prefix caching: pure continuous batching with chunked prefill.
    let mut e = engine(WeightFormat::F32, KvDtype::F32, 256, 16, false);
    let ps = prompts(&e, false);
    let o = run(&mut e, &mut reference, &ps, 0);
    report("ample pool", &o, F32_TOL);
    assert_eq!(o.preemptions, 0);

    // 2. A pool that holds all eight prompts but not their growth (4-token blocks, so growth
    //    needs blocks often): preemption by recompute must happen and must not change logits.
    let prompt_blocks: usize = ps.iter().map(|p| p.len().div_ceil(4)).sum();
    let mut e = engine(WeightFormat::F32, KvDtype::F32, prompt_blocks + 4, 4, false);
    let o = run(&mut e, &mut reference, &ps, 0);
    report("small pool", &o, F32_TOL);
    assert!(o.preemptions > 0, "the small pool must force preemptions");

    // 3. Shared system prompt with prefix caching: later requests reuse earlier blocks.
    let mut e = engine(WeightFormat::F32, KvDtype::F32, 256, 16, true);
    let ps = prompts(&e, true);
    // The first request computes the shared prefix; the rest arrive one step later.
    let o = {
        let mut reference_first = run(&mut e, &mut reference, &ps[..1], 100);
        let rest = run(&mut e, &mut reference, &ps[1..], 101);
        reference_first.worst_rel = reference_first.worst_rel.max(rest.worst_rel);
        reference_first.near_ties.extend(rest.near_ties);
        reference_first.prefix_hits = rest.prefix_hits;
        reference_first
    };
    report("prefix sharing", &o, F32_TOL);
    assert!(
        o.prefix_hits >= 7 * 16,
        "the shared system prompt must be served from the prefix cache"
    );

    // 4. The f16 KV cache (the serving default) alone: the same f32 weights, keys and values
    //    rounded when stored.
    let mut e = engine(WeightFormat::F32, KvDtype::F16, 256, 16, false);
    let ps = prompts(&e, false);
    let o = run(&mut e, &mut reference, &ps, 0);
    report("f16 kv cache", &o, F16_KV_TOL);

    // 5. The Q8_0 format: weights re-quantized at load (a second rounding of the file's 4-bit
    //    weights), so a looser bound; f32 KV, so the bound is the weights' alone.
    let mut e = engine(WeightFormat::Q8_0, KvDtype::F32, 256, 16, false);
    let o = run(&mut e, &mut reference, &ps, 0);
    report("q8_0 weights", &o, Q8_TOL);

    // 6. What is served by default: the file's own Q4_1 blocks through our Q4_1 kernel, with
    //    the f16 KV cache. Then the hybrid that switches kernels by step size (steps shrink
    //    from 8 tokens to 1 as sequences finish).
    for (name, format, kv) in [
        ("q4_1 weights, f16 kv", WeightFormat::Q4_1, KvDtype::F16),
        ("auto weights", WeightFormat::Auto, KvDtype::F32),
    ] {
        let mut e = engine(format, kv, 256, 16, false);
        let o = run(&mut e, &mut reference, &ps, 0);
        report(name, &o, Q8_TOL);
    }
}
