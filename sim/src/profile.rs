//! Engine profiles: how long one engine step takes, and how much KV cache a replica has.
//!
//! A step's time is `base + per_token * scheduled tokens + per_context_token * context read`:
//! the fixed cost of reading the weights once per step, the compute per token, and attention
//! reading each scheduled sequence's KV cache. Two presets:
//!
//! - `gpu-8b`: Llama-3.1-8B-Instruct in BF16 on one H100-80GB under vLLM. `base` from the
//!   published single-stream time per output token of 6.48 ms (InferenceBench concurrency sweep,
//!   vLLM 0.21, H100-80GB-HBM3, <https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/>);
//!   `per_token` 0.04 ms, i.e. 25k prefill tokens/s, about 40% of the H100's 989 dense BF16
//!   TFLOPS at 16 GFLOP per token; `per_context_token` from reading 128 KiB of KV per token
//!   (32 layers x 8 KV heads x 128 x 2 x BF16) at 3.35 TB/s. KV pool: 52 GiB (90% of 80 GB less
//!   16 GB of weights and activations) = 425,984 tokens. vLLM's defaults: 256 sequences, and a
//!   2048-token step budget (a full chunk then takes 88 ms, inside a 100 ms ITL objective).
//! - `gpu-8b-bare`: the same model's bare GPU work on an H100-80GB-HBM3, measured with
//!   `scripts/gpu-profile-check.py` (PyTorch 2.11, CUDA graphs, an 8B-shaped BF16 decoder; fit
//!   over 5 prefill and 6 decode steps, 2026-11-26): `base` 6.21 ms and `per_context_token`
//!   39.4 ns agree with `gpu-8b`; `per_token` is 22.8 us (37k prefill tokens/s), 1.75x faster
//!   than `gpu-8b` assumes. What vLLM adds on top (scheduling, sampling, paged KV) makes it an
//!   upper bound on a real engine's speed: a replay the policy must hold with other capacities.
//! - `cpu-smollm2`: redline-engine serving SmolLM2-135M Q4_1 on 2 vCPUs, from docs/bench.md
//!   (ITL 15 ms at 1 stream, 43 ms at 8, 149 ms at 32: ~11 ms + 4.3 ms per token), with the
//!   engine's default 256 MiB pool: 728 blocks of 16 tokens at 22.5 KiB per token (30 layers
//!   x 3 KV heads x 64 x 2 x f16).

use redline_api::Limits;
use redline_autoscale::ReplicaCapacity;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineProfile {
    pub name: &'static str,
    pub step_base_seconds: f64,
    pub per_token_seconds: f64,
    pub per_context_token_seconds: f64,
    pub kv_blocks: u32,
    pub block_size: u32,
    /// The engine's limits at start (and the ceiling the guard and operator move under).
    pub limits: Limits,
    /// Typical context of a decoding sequence, for the capacity estimate.
    pub typical_context_tokens: u32,
}

impl EngineProfile {
    pub fn gpu_8b() -> Self {
        Self {
            name: "gpu-8b",
            step_base_seconds: 0.0063,
            per_token_seconds: 0.000_04,
            per_context_token_seconds: 0.000_000_04,
            kv_blocks: 425_984 / 16,
            block_size: 16,
            limits: Limits::new(256, 2048),
            typical_context_tokens: 2048,
        }
    }

    pub fn gpu_8b_bare() -> Self {
        Self {
            name: "gpu-8b-bare",
            step_base_seconds: 0.00621,
            per_token_seconds: 0.000_022_8,
            per_context_token_seconds: 0.000_000_039_4,
            ..Self::gpu_8b()
        }
    }

    pub fn cpu_smollm2() -> Self {
        Self {
            name: "cpu-smollm2",
            step_base_seconds: 0.011,
            per_token_seconds: 0.0043,
            per_context_token_seconds: 0.000_000_5,
            kv_blocks: 728,
            block_size: 16,
            limits: Limits::new(64, 256),
            typical_context_tokens: 256,
        }
    }

    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "gpu-8b" => Some(Self::gpu_8b()),
            "gpu-8b-bare" => Some(Self::gpu_8b_bare()),
            "cpu-smollm2" => Some(Self::cpu_smollm2()),
            _ => None,
        }
    }

    pub fn step_seconds(&self, tokens: u32, context_read: u64) -> f64 {
        self.step_base_seconds
            + self.per_token_seconds * tokens as f64
            + self.per_context_token_seconds * context_read as f64
    }

    /// One sequence decoding alone at a short context, as a bench measures it: the fixed cost
    /// every step pays whatever its batch.
    pub fn lone_step_seconds(&self) -> f64 {
        self.step_seconds(1, 1)
    }

    /// What one replica sustains: prompt tokens/s in full prefill steps, generated tokens/s
    /// with a full batch of typical contexts. What a bench of the engine would report; the
    /// policy is configured with it, as an operator would from such a bench.
    pub fn capacity(&self) -> ReplicaCapacity {
        let chunk = self.limits.max_batched_tokens;
        let prompt = chunk as f64 / self.step_seconds(chunk, chunk as u64);
        let seqs = self.limits.max_num_seqs.min(chunk);
        let ctx = seqs as u64 * self.typical_context_tokens as u64;
        let gen = seqs as f64 / self.step_seconds(seqs, ctx);
        ReplicaCapacity {
            prompt_tokens_per_second: prompt,
            generation_tokens_per_second: gen,
            step_seconds: Some(self.lone_step_seconds()),
        }
    }

    pub fn kv_tokens(&self) -> u64 {
        self.kv_blocks as u64 * self.block_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_profile_matches_its_sources() {
        let p = EngineProfile::gpu_8b();
        // One decoding stream: the published 6.48 ms per output token, within 0.2 ms.
        assert!((p.step_seconds(1, 1024) - 0.00648).abs() < 0.0002);
        // A full 2048-token chunk stays inside a 100 ms inter-token objective.
        assert!(p.step_seconds(2048, 2048) < 0.1);
        let c = p.capacity();
        assert!(
            (20_000.0..25_000.0).contains(&c.prompt_tokens_per_second),
            "{c:?}"
        );
    }

    #[test]
    fn the_measured_gpu_profile_is_the_fit_from_the_h100() {
        let (p, g) = (EngineProfile::gpu_8b_bare(), EngineProfile::gpu_8b());
        // scripts/gpu-profile-check.py on the H100: a 2048-token chunk took 54.7 ms, one
        // stream over 1024 tokens of context 7.5 ms, 256 streams over 1024 each 21.1 ms.
        assert!((p.step_seconds(2048, 2048) - 0.0547).abs() < 0.003);
        assert!((p.step_seconds(1, 1024) - 0.0075).abs() < 0.0015);
        assert!((p.step_seconds(256, 256 * 1024) - 0.0211).abs() < 0.002);
        // Same pool and limits as the vLLM profile: only the speed differs.
        assert_eq!((p.kv_blocks, p.limits), (g.kv_blocks, g.limits));
        assert!(p.capacity().prompt_tokens_per_second > 35_000.0);
    }
}
