//! What to send: a slice of a trace, thinned and capped to what the pods can hold, and prompts
//! of a known token length that never share a cached prefix.

use redline_sim::trace::{Replay, Request};

/// The burst that the README's main job and the closed-loop test replay: the code trace's first
/// burst (its minutes 2.8 to 4.8, twice as fast), one request in 24, prompts a quarter as long
/// (at most 384 tokens): peaks of about 300 prompt tokens/s, twice what one CPU pod of the
/// default model takes, and about 100 on average, what a 2-core machine can serve.
pub const CODE_BURST: (Replay, Slice) = (
    Replay {
        time_compression: 2.0,
        token_scale: 0.25,
        duration: None,
    },
    Slice {
        start: 85.0,
        duration: 60.0,
        keep_every: 24,
        max_prompt_tokens: 384,
        max_output_tokens: 64,
    },
);

/// The bundled code trace (see sim/traces/README.md for its source and licence).
pub const CODE_TRACE: &str = "sim/traces/azure-llm-2023-code.csv";

/// Which part of a (time-compressed, token-scaled) trace to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slice {
    /// Seconds into the trace where the replay starts.
    pub start: f64,
    /// Seconds of trace replayed.
    pub duration: f64,
    /// Keep one request in this many (1 keeps all): a small cluster sees the trace's shape at a
    /// rate it can serve, without scaling every prompt down to nothing.
    pub keep_every: usize,
    /// Prompt and output caps: a request longer than a pod's KV pool would be refused, which
    /// is the client's error, not the loop's.
    pub max_prompt_tokens: u32,
    pub max_output_tokens: u32,
}

/// The requests of `trace` inside the slice, arrivals shifted to start at 0.
pub fn slice(trace: &[Request], s: &Slice) -> Vec<Request> {
    let end = s.start + s.duration;
    trace
        .iter()
        .filter(|r| r.arrival >= s.start && r.arrival < end)
        .enumerate()
        .filter(|(i, _)| i % s.keep_every.max(1) == 0)
        .map(|(_, r)| Request {
            arrival: r.arrival - s.start,
            prompt_tokens: r.prompt_tokens.clamp(1, s.max_prompt_tokens),
            output_tokens: r.output_tokens.clamp(1, s.max_output_tokens),
        })
        .collect()
}

/// Words that a GPT-2-style BPE (SmolLM2's, Llama 3's) encodes as one token each after a space.
const WORDS: [&str; 16] = [
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " at", " by",
];

/// A prompt of about `tokens` tokens. It opens with the request's number so no two prompts
/// share a cached prefix block (the prefix cache would otherwise hide their KV cost).
pub fn prompt(id: usize, tokens: u32) -> String {
    let mut p = format!("Request {id}:");
    // "Request", " N" and ":" are about three tokens.
    let mut h = id as u64;
    for _ in 3..tokens.max(4) {
        h = h
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.push_str(WORDS[(h >> 60) as usize]);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(arrival: f64, p: u32, o: u32) -> Request {
        Request {
            arrival,
            prompt_tokens: p,
            output_tokens: o,
        }
    }

    #[test]
    fn slices_thins_and_caps() {
        let t: Vec<Request> = (0..100).map(|i| req(i as f64, 10 * i + 1, i + 1)).collect();
        let s = slice(
            &t,
            &Slice {
                start: 10.0,
                duration: 20.0,
                keep_every: 4,
                max_prompt_tokens: 150,
                max_output_tokens: 12,
            },
        );
        assert_eq!(s.len(), 5, "{s:?}");
        assert_eq!(s[0], req(0.0, 101, 11));
        assert_eq!(s[1], req(4.0, 141, 12));
        assert_eq!(s[4].prompt_tokens, 150);
    }

    proptest! {
        #[test]
        fn prompts_are_unique_and_sized(a in 0usize..10_000, b in 0usize..10_000, n in 4u32..600) {
            let p = prompt(a, n);
            prop_assert_eq!(p.split_whitespace().count() as u32, n - 1);
            if a != b {
                prop_assert_ne!(&p[..12.min(p.len())], &prompt(b, n)[..12.min(p.len())]);
            }
        }
    }
}
