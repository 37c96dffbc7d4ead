//! Next-token choice from logits, as vLLM's sampler orders it: the logit bias and the
//! repetition, frequency and presence penalties first (greedy takes the argmax of what they
//! leave), then temperature, min-p, top-k and nucleus (top-p) cuts, and a draw from a
//! per-request seeded generator, so a request with a `seed` is reproducible whatever else is
//! in the batch.

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// Keep only the `k` likeliest tokens; `None`: all.
    pub top_k: Option<usize>,
    /// Drop tokens less likely than this share of the likeliest one's probability; 0: off.
    pub min_p: f32,
    /// OpenAI's: subtracted from a token's logit once it has been generated at all...
    pub presence_penalty: f32,
    /// ...and this many times for each time it has been generated.
    pub frequency_penalty: f32,
    /// vLLM's (and Hugging Face's): a token of the prompt or the output has its logit divided
    /// by this when positive, multiplied when negative; 1: off.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`, -100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether a penalty reads what was generated (only then is it counted).
    fn penalizes_repeats(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    fn adjusts_logits(&self) -> bool {
        !self.logit_bias.is_empty() || self.penalizes_repeats()
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token has been generated (the presence and frequency penalties).
    generated: HashMap<u32, u32>,
    /// The prompt's tokens, kept only for the repetition penalty.
    prompt: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let prompt = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            rng,
            generated: HashMap::new(),
            prompt,
        }
    }

    /// The next token; it counts as generated from here on (for the penalties; without them
    /// nothing is kept per token).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if self.params.adjusts_logits() {
            let adjusted = self.adjust(logits);
            self.choose(&adjusted)
        } else {
            self.choose(logits)
        };
        if self.params.penalizes_repeats() {
            *self.generated.entry(token).or_default() += 1;
        }
        token
    }

    fn adjust(&self, logits: &[f32]) -> Vec<f32> {
        let p = &self.params;
        let mut l = logits.to_vec();
        for &(id, bias) in &p.logit_bias {
            if let Some(v) = l.get_mut(id as usize) {
                *v += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let output_only = self.generated.keys().filter(|id| !self.prompt.contains(id));
            for &id in self.prompt.iter().chain(output_only) {
                if let Some(v) = l.get_mut(id as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        for (&id, &n) in &self.generated {
            if let Some(v) = l.get_mut(id as usize) {
                *v -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
        l
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == Some(1) {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, ((l - max) * inv_t).exp()))
            .collect();
        // Relative to the likeliest token, whose weight is exp(0) = 1.
        if p.min_p > 0.0 {
            probs.retain(|t| t.1 >= p.min_p);
        }
        let k = p.top_k.unwrap_or(usize::MAX);
        if p.top_p < 1.0 || k < probs.len() {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            probs.truncate(k.max(1));
        }
        if p.top_p < 1.0 {
            let total: f32 = probs.iter().map(|p| p.1).sum();
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, t) in probs.iter().enumerate() {
                acc += t.1 / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for (id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return *id;
            }
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// A sampled token's log-probability and its likeliest alternatives'.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The `n` likeliest tokens, likeliest first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities under the model's own distribution: the raw logits, before biases,
/// penalties and temperature (what vLLM reports by default, and OpenAI too).
pub fn logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(top.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if n > 0 && n < top.len() {
        top.select_nth_unstable_by(n - 1, by_logit);
    }
    top.truncate(n);
    top.sort_unstable_by(by_logit);
    TokenLogprobs {
        token,
        logprob: logits[token as usize] - lse,
        top: top
            .into_iter()
            .map(|t| (t, logits[t as usize] - lse))
            .collect(),
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_top_p_cuts_the_tail() {
        let logits: Vec<f32> = (0..50).map(|i| -(i as f32) * 0.1).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..100).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p, &[]);
            (0..100).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        // The top 50% of mass lies in roughly the first 10 tokens.
        assert!(a.iter().all(|&t| t < 12), "{a:?}");
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 must vary");
    }

    fn greedy(p: SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..p
        }
    }

    #[test]
    fn sampling_parameters_that_are_off_change_nothing() {
        // The defaults draw exactly what plain temperature sampling drew before them.
        let logits: Vec<f32> = (0..40).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let seeded = SamplingParams {
            seed: Some(11),
            ..Default::default()
        };
        let mut a = Sampler::new(seeded.clone(), &[]);
        let mut b = Sampler::new(
            SamplingParams {
                top_k: Some(40),
                min_p: 0.0,
                repetition_penalty: 1.0,
                ..seeded
            },
            &[1, 2, 3],
        );
        for _ in 0..50 {
            assert_eq!(a.sample(&logits), b.sample(&logits));
        }
    }

    #[test]
    fn presence_and_frequency_penalties_push_away_what_was_generated() {
        // Flat logits, greedy: without penalties the same token forever.
        let flat = [1.0, 1.0, 1.0, 1.0];
        let mut plain = Sampler::new(greedy(SamplingParams::default()), &[]);
        assert!((0..4).all(|_| plain.sample(&flat) == 0));
        // Presence: each token once, then the first again (all penalized alike).
        let mut s = Sampler::new(
            greedy(SamplingParams {
                presence_penalty: 0.5,
                ..Default::default()
            }),
            &[],
        );
        let picks: Vec<u32> = (0..5).map(|_| s.sample(&flat)).collect();
        assert_eq!(picks, [0, 1, 2, 3, 0]);
        // Frequency: the penalty grows with the count, so a strong favourite is left once it
        // has been said often enough (3.0 - 0.4 n < 2.0 from n = 3).
        let mut s = Sampler::new(
            greedy(SamplingParams {
                frequency_penalty: 0.4,
                ..Default::default()
            }),
            &[],
        );
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&[3.0, 2.0])).collect();
        assert_eq!(picks, [0, 0, 0, 1]);
        // A negative penalty encourages repeats.
        let mut s = Sampler::new(
            greedy(SamplingParams {
                presence_penalty: -1.0,
                ..Default::default()
            }),
            &[],
        );
        s.sample(&[1.0, 1.5]);
        assert_eq!(s.sample(&[1.4, 1.0]), 1, "token 1 gained 1.0");
    }

    #[test]
    fn the_repetition_penalty_covers_the_prompt_and_divides_or_multiplies_by_sign() {
        let p = greedy(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // Token 0 is in the prompt: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(Sampler::new(p.clone(), &[0]).sample(&[3.0, 2.0]), 1);
        assert_eq!(Sampler::new(p.clone(), &[]).sample(&[3.0, 2.0]), 0);
        // Negative logits are multiplied: -1.0 x 2 = -2.0 < -1.5.
        assert_eq!(Sampler::new(p.clone(), &[0]).sample(&[-1.0, -1.5]), 1);
        // A token in the prompt and the output is penalized once, not twice.
        let mut s = Sampler::new(p, &[0]);
        assert_eq!(s.sample(&[5.0, 2.0]), 0); // 2.5 > 2.0
        assert_eq!(s.sample(&[5.0, 2.0]), 0, "penalized twice it would be 1.25");
    }

    #[test]
    fn the_logit_bias_can_force_or_forbid_a_token() {
        let logits = [2.0, 1.0, 0.5];
        let force = greedy(SamplingParams {
            logit_bias: vec![(2, 100.0)],
            ..Default::default()
        });
        assert_eq!(Sampler::new(force, &[]).sample(&logits), 2);
        let forbid = SamplingParams {
            logit_bias: vec![(0, -100.0)],
            seed: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(forbid, &[]);
        assert!((0..200).all(|_| s.sample(&logits) != 0));
        // An id past the vocabulary is no row to bias (the server refuses it first).
        let past = greedy(SamplingParams {
            logit_bias: vec![(9, 100.0)],
            ..Default::default()
        });
        assert_eq!(Sampler::new(past, &[]).sample(&logits), 0);
    }

    proptest::proptest! {
        /// Whatever the logits and the seed, a draw is among the `top_k` likeliest tokens and
        /// at least `min_p` times as likely as the likeliest; top_k 1 is greedy.
        #[test]
        fn a_draw_respects_top_k_and_min_p(
            logits in proptest::collection::vec(-5.0f32..5.0, 2..64),
            k in 1usize..8,
            min_p in 0.0f32..0.9,
            t in 0.2f32..2.0,
            seed: u64,
        ) {
            let p = SamplingParams {
                temperature: t,
                top_k: Some(k),
                min_p,
                seed: Some(seed),
                ..Default::default()
            };
            let mut s = Sampler::new(p, &[]);
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            for _ in 0..8 {
                let id = s.sample(&logits) as usize;
                let higher = logits.iter().filter(|l| **l > logits[id]).count();
                proptest::prop_assert!(higher < k, "token {id} has {higher} likelier");
                let share = ((logits[id] - max) / t).exp();
                proptest::prop_assert!(share >= min_p * 0.999, "share {share} < min_p {min_p}");
            }
            let mut one = Sampler::new(
                SamplingParams { temperature: t, top_k: Some(1), seed: Some(seed), ..Default::default() },
                &[],
            );
            proptest::prop_assert_eq!(one.sample(&logits), argmax(&logits));
        }
    }

    #[test]
    fn logprobs_are_the_raw_distribution_and_the_top_is_sorted() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lp = logprobs(&logits, 4, 3);
        // exp(logprob) over all tokens sums to 1.
        let sum: f32 = (0..5).map(|t| logprobs(&logits, t, 0).logprob.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        assert_eq!(lp.token, 4);
        assert!(
            (lp.logprob - (0.5 - (logits.iter().map(|l| l.exp()).sum::<f32>()).ln())).abs() < 1e-5
        );
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids.len(), 3);
        assert!(
            ids[..2].contains(&1) && ids[..2].contains(&3) && ids[2] == 0,
            "{ids:?}"
        );
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 0, 99).top.len(), 5);
    }
}
