//! Llama-architecture transformer loaded from GGUF, run as one forward pass per engine step.
//!
//! All tokens of a step (decodes and prefill chunks of many sequences) are stacked into one
//! `[tokens, hidden]` activation, so every weight matrix is read once per step for the whole
//! batch. Attention goes through the paged KV store. Weights are re-packed at load: Q, K, V
//! fused into one matrix and gate/up into another (fewer, larger matmuls), in the format the
//! caller chose (Q8_0 or f32), executed by candle.

use crate::paged_attention::{KvStore, TokenCtx};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid GGUF model: {0}")]
    Format(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Re-quantize every matrix to Q8_0 at load, run by our batched AVX2 kernel.
    /// Batch-invariant: a token's logits do not depend on what else is in the step.
    Q8_0,
    /// The file's own Q4_1 blocks for every step (half the bytes of Q8_0; batch-invariant; the
    /// serving default). Falls back to Q8_0 for tensors that are not Q4_1.
    Q4_1,
    /// Q4_1 for steps of at most 4 tokens (bandwidth-bound), Q8_0 for larger ones
    /// (compute-bound). Fastest, but NOT batch-invariant: the two kernels use different
    /// weights, so a request's greedy output can depend on what shares its steps.
    Auto,
    /// The same Q8_0 weights run by candle's quantized matmul (for comparison).
    CandleQ8_0,
    /// Dequantize to f32, run by candle's f32 matmul (the exactness reference).
    F32,
}

/// Steps of at most this many tokens use the 4-bit weights in `Linear::Hybrid`.
const SMALL_STEP: usize = 4;

/// A weight matrix and the kernel that runs it.
enum Linear {
    Candle(QMatMul),
    Q8(crate::q8_matmul::Q8Matrix),
    Q4(crate::q4_matmul::Q4Matrix),
    Hybrid {
        small: crate::q4_matmul::Q4Matrix,
        large: crate::q8_matmul::Q8Matrix,
    },
}

impl Linear {
    /// Appends row `r` as f32. Only for the kernels that keep a file's blocks as stored.
    fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        match self {
            Self::Q8(m) => m.dequantize_row(r, out),
            Self::Q4(m) => m.dequantize_row(r, out),
            _ => unreachable!("OutputRows is only chosen for Q8 and Q4 output matrices"),
        }
    }

    fn forward(&self, x: Vec<f32>, rows: usize, cols: usize) -> Result<Vec<f32>> {
        match self {
            Self::Q8(m) => Ok(m.matmul(&x, rows)),
            Self::Q4(m) => Ok(m.matmul(&x, rows)),
            Self::Hybrid { small, .. } if rows <= SMALL_STEP => Ok(small.matmul(&x, rows)),
            Self::Hybrid { large, .. } => Ok(large.matmul(&x, rows)),
            Self::Candle(w) => {
                let t = Tensor::from_vec(x, (rows, cols), &Device::Cpu)?;
                Ok(w.forward(&t)?.flatten_all()?.to_vec1()?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub context_length: usize,
    pub vocab: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

/// Where a token's input vector comes from.
enum Embedding {
    /// A dequantized f32 table, `[vocab, hidden]`.
    Table(Vec<f32>),
    /// The row of the tied output matrix, dequantized on lookup (candle's arithmetic, so the
    /// same numbers as the table).
    OutputRows,
}

pub struct Model {
    pub cfg: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    lm_head: Linear,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

/// One step's input: a token per row, where it attends, and which rows need logits.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub ctx: &'a [TokenCtx<'a>],
    pub logit_rows: &'a [usize],
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| ModelError::Format(format!("missing metadata key `{key}`")))
}

fn md_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    Ok(md(ct, key)?.to_u32()? as usize)
}

impl LlamaConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let architecture = md(ct, "general.architecture")?.to_string()?.clone();
        if architecture != "llama" {
            return Err(ModelError::Format(format!(
                "architecture `{architecture}` is not supported (llama only)"
            )));
        }
        let hidden = md_usize(ct, "llama.embedding_length")?;
        let n_head = md_usize(ct, "llama.attention.head_count")?;
        let vocab = match md(ct, "llama.vocab_size") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => md(ct, "tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        let cfg = Self {
            architecture,
            n_layer: md_usize(ct, "llama.block_count")?,
            hidden,
            n_head,
            n_kv_head: md_usize(ct, "llama.attention.head_count_kv")?,
            head_dim: hidden / n_head,
            ffn: md_usize(ct, "llama.feed_forward_length")?,
            rms_eps: md(ct, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?,
            rope_base: md(ct, "llama.rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            context_length: md_usize(ct, "llama.context_length")?,
            vocab,
        };
        if !cfg.n_head.is_multiple_of(cfg.n_kv_head) || !hidden.is_multiple_of(n_head) {
            return Err(ModelError::Format("inconsistent head counts".into()));
        }
        Ok(cfg)
    }

    /// KV bytes per token in a pool of `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: crate::paged_attention::KvDtype) -> usize {
        KvStore::bytes_per_token(self.n_layer, self.n_kv_head, self.head_dim, dtype)
    }
}

/// Reads a GGUF file's header (metadata and tensor index) without loading weights.
pub fn read_gguf(path: &Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let mut f = std::fs::File::open(path).map_err(|source| ModelError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
    Ok((ct, f))
}

impl Model {
    pub fn load(
        ct: &gguf_file::Content,
        file: &mut std::fs::File,
        format: WeightFormat,
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(ct)?;
        let dev = Device::Cpu;
        let mut get = |name: &str| -> Result<QTensor> {
            ct.tensor(file, name, &dev)
                .map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}")))
        };
        let deq = |q: &QTensor| -> Result<Tensor> { Ok(q.dequantize(&dev)?) };
        let q8 = |q: QTensor| -> Result<Linear> {
            Ok(match format {
                WeightFormat::CandleQ8_0 => Linear::Candle(QMatMul::from_qtensor(q)?),
                _ => Linear::Q8(
                    crate::q8_matmul::Q8Matrix::from_qtensor(&q)
                        .map_err(|e| ModelError::Format(e.to_string()))?,
                ),
            })
        };
        let pack = |t: Tensor| -> Result<Linear> {
            match format {
                WeightFormat::F32 => Ok(Linear::Candle(QMatMul::Tensor(t))),
                _ => q8(QTensor::quantize(&t, GgmlDType::Q8_0)?),
            }
        };
        let vec1 = |q: QTensor| -> Result<Vec<f32>> { Ok(q.dequantize(&dev)?.to_vec1()?) };
        // Row-stacks the parts (fused QKV, gate/up) in the chosen format.
        let fuse = |parts: Vec<QTensor>| -> Result<Linear> {
            let all_q4 = parts.iter().all(|p| p.dtype() == GgmlDType::Q4_1);
            let q4 = || -> Result<crate::q4_matmul::Q4Matrix> {
                let refs: Vec<&QTensor> = parts.iter().collect();
                crate::q4_matmul::Q4Matrix::from_qtensors(&refs)
                    .map_err(|e| ModelError::Format(e.to_string()))
            };
            if format == WeightFormat::Q4_1 && all_q4 {
                return Ok(Linear::Q4(q4()?));
            }
            let dense = parts.iter().map(deq).collect::<Result<Vec<_>>>()?;
            let large = pack(Tensor::cat(&dense, 0)?)?;
            match large {
                Linear::Q8(large) if format == WeightFormat::Auto && all_q4 => Ok(Linear::Hybrid {
                    small: q4()?,
                    large,
                }),
                other => Ok(other),
            }
        };

        let embd_q = get("token_embd.weight")?;
        let table = |q: &QTensor| -> Result<Embedding> {
            Ok(Embedding::Table(deq(q)?.flatten_all()?.to_vec1()?))
        };
        let (lm_head, embed) = match get("output.weight") {
            Ok(w) => (fuse(vec![w])?, table(&embd_q)?),
            // Tied embeddings stored as Q8_0: use the file's blocks as they are, for the
            // output and (dequantized per token) for the input, instead of a 113 MB f32 copy.
            Err(_) if embd_q.dtype() == GgmlDType::Q8_0 && format != WeightFormat::F32 => {
                (q8(embd_q)?, Embedding::OutputRows)
            }
            // Tied Q4_1 embeddings: the 4-bit format keeps them 4-bit too.
            Err(_) if embd_q.dtype() == GgmlDType::Q4_1 && format == WeightFormat::Q4_1 => {
                (fuse(vec![embd_q])?, Embedding::OutputRows)
            }
            Err(_) => {
                let w = deq(&embd_q)?;
                let embed = Embedding::Table(w.flatten_all()?.to_vec1()?);
                (pack(w)?, embed)
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let mut t = |n: &str| get(&format!("{p}.{n}.weight"));
            let qkv = vec![t("attn_q")?, t("attn_k")?, t("attn_v")?];
            let gate_up = vec![t("ffn_gate")?, t("ffn_up")?];
            let (wo, down) = (t("attn_output")?, t("ffn_down")?);
            layers.push(Layer {
                attn_norm: vec1(get(&format!("{p}.attn_norm.weight"))?)?,
                qkv: fuse(qkv)?,
                wo: fuse(vec![wo])?,
                ffn_norm: vec1(get(&format!("{p}.ffn_norm.weight"))?)?,
                gate_up: fuse(gate_up)?,
                down: fuse(vec![down])?,
            });
        }
        let out_norm = vec1(get("output_norm.weight")?)?;
        let (rope_cos, rope_sin) = rope_tables(cfg.head_dim, cfg.rope_base, cfg.context_length);
        Ok(Self {
            cfg,
            embed,
            layers,
            out_norm,
            lm_head,
            rope_cos,
            rope_sin,
        })
    }

    /// Runs the whole step; returns logits for `batch.logit_rows`, in that order.
    pub fn forward(&self, kv: &mut KvStore, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (t, h, hd) = (batch.tokens.len(), c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.n_head * hd, c.n_kv_head * hd);
        let mut x = Vec::with_capacity(t * h);
        for &tok in batch.tokens {
            let tok = tok as usize;
            if tok >= c.vocab {
                return Err(ModelError::Format(format!(
                    "token id {tok} out of vocabulary"
                )));
            }
            match &self.embed {
                Embedding::Table(t) => x.extend_from_slice(&t[tok * h..(tok + 1) * h]),
                Embedding::OutputRows => self.lm_head.dequantize_row(tok, &mut x),
            }
        }
        for (li, l) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &l.attn_norm, c.rms_eps);
            let qkv = l.qkv.forward(xn, t, h)?;
            let stride = q_dim + 2 * kv_dim;
            let mut q = Vec::with_capacity(t * q_dim);
            for (ti, row) in qkv.chunks_exact(stride).enumerate() {
                let pos = batch.ctx[ti].pos;
                let mut qr = row[..q_dim].to_vec();
                let mut kr = row[q_dim..q_dim + kv_dim].to_vec();
                self.rope(&mut qr, pos);
                self.rope(&mut kr, pos);
                kv.write(li, batch.ctx[ti], &kr, &row[q_dim + kv_dim..]);
                q.extend_from_slice(&qr);
            }
            let attn = kv.attention(li, &q, batch.ctx, c.n_head);
            add_assign(&mut x, &l.wo.forward(attn, t, q_dim)?);
            let xn = rms_norm(&x, &l.ffn_norm, c.rms_eps);
            let gu = l.gate_up.forward(xn, t, h)?;
            // SiLU(g) * u, with e^-g for the whole row at once (vectorized exp).
            let mut act = Vec::with_capacity(t * c.ffn);
            let mut e = vec![0.0f32; c.ffn];
            for row in gu.chunks_exact(2 * c.ffn) {
                let (g, u) = row.split_at(c.ffn);
                e.iter_mut().zip(g).for_each(|(e, g)| *e = -g);
                crate::exp::exp_in_place(&mut e);
                act.extend(g.iter().zip(u).zip(&e).map(|((g, u), e)| g / (1.0 + e) * u));
            }
            add_assign(&mut x, &l.down.forward(act, t, c.ffn)?);
        }
        // Only the rows that sample pay for the vocabulary projection.
        let mut rows = Vec::with_capacity(batch.logit_rows.len() * h);
        for &r in batch.logit_rows {
            rows.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let n = batch.logit_rows.len();
        let logits = self
            .lm_head
            .forward(rms_norm(&rows, &self.out_norm, c.rms_eps), n, h)?;
        Ok(logits.chunks_exact(c.vocab).map(|r| r.to_vec()).collect())
    }

    /// Interleaved ("normal", GGML llama) rotary embedding over every head of one token.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = (
            &self.rope_cos[pos * half..(pos + 1) * half],
            &self.rope_sin[pos * half..(pos + 1) * half],
        );
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

fn rope_tables(head_dim: usize, base: f32, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let theta = 1.0 / base.powf(2.0 * i as f32 / head_dim as f32);
            let a = p as f32 * theta;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let s = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v * s * g));
    }
    out
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
