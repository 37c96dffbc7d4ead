//! Q4_1 x Q8_1 matmul on the GGUF file's own 4-bit blocks, for small steps.
//!
//! Why: decoding one or a few tokens per step is bound by memory bandwidth, not arithmetic.
//! Measured on the 2-vCPU bench machine: ~10 GB/s effective with 2 threads, so Q8_0 weights
//! (143 MB per token for SmolLM2-135M) cap batch-1 decode near 70 tokens/s, while llama.cpp
//! reading the Q4_1 file (~75 MB per token) reaches ~95-140. Keeping the file's Q4_1 blocks halves
//! the bytes per token. For larger steps the Q8_0 kernel wins (fewer instructions per weight), so
//! the model holds both and picks per step (see `model::Linear`).
//!
//! Numerics are ggml's `vec_dot_q4_1_q8_1`: weight = d·q + m with q in 0..16; activations
//! quantized per 32-block to int8 with f16 scale d and s = d·Σq (f16), so
//! dot = d_w·d_x·Σ(q_w·q_x) + m_w·s_x. Tested against candle's Q4_1 matmul.

use crate::q8_matmul::{by_row_tiles, has_avx2_fma};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

const QK: usize = 32;

pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    /// Per block: d, m.
    d: Vec<f32>,
    m: Vec<f32>,
    /// 16 bytes per block: element j in the low nibble of byte j, element j+16 in the high one.
    qs: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("expected 2-D Q4_1 tensors with rows of whole blocks, got {0:?} {1:?}")]
pub struct Q4Error(GgmlDType, Vec<usize>);

impl Q4Matrix {
    /// Stacks the rows of several Q4_1 tensors with equal column counts (fused QKV, gate/up),
    /// taking their blocks exactly as stored.
    pub fn from_qtensors(parts: &[&QTensor]) -> Result<Self, Q4Error> {
        let mut out = Self {
            rows: 0,
            cols: 0,
            d: vec![],
            m: vec![],
            qs: vec![],
        };
        for q in parts {
            let dims = q.shape().dims().to_vec();
            let bad = || Q4Error(q.dtype(), dims.clone());
            if q.dtype() != GgmlDType::Q4_1 || dims.len() != 2 || dims[1] % QK != 0 {
                return Err(bad());
            }
            if out.cols != 0 && out.cols != dims[1] {
                return Err(bad());
            }
            out.cols = dims[1];
            out.rows += dims[0];
            let raw = q.data().map_err(|_| bad())?;
            for b in raw.chunks_exact(4 + QK / 2) {
                out.d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
                out.m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
                out.qs.extend_from_slice(&b[4..]);
            }
        }
        Ok(out)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x` is `[t, cols]`; returns `[t, rows]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.cols, "activation shape");
        let nb = self.cols / QK;
        let xa = quantize_q8_1(x);
        let avx2 = has_avx2_fma();
        by_row_tiles(self.rows, t, |r0, out| {
            for tok in 0..t {
                let xs = &xa.qs[tok * self.cols..(tok + 1) * self.cols];
                let (xd, xsum) = (
                    &xa.d[tok * nb..(tok + 1) * nb],
                    &xa.s[tok * nb..(tok + 1) * nb],
                );
                for r in 0..out.len() / t {
                    let row = r0 + r;
                    let (q, d, m) = (
                        &self.qs[row * nb * 16..(row + 1) * nb * 16],
                        &self.d[row * nb..(row + 1) * nb],
                        &self.m[row * nb..(row + 1) * nb],
                    );
                    #[cfg(target_arch = "x86_64")]
                    let v = if avx2 {
                        // SAFETY: AVX2 and FMA detected at run time; slices in bounds by shape.
                        unsafe { avx2::dot(q, d, m, xs, xd, xsum) }
                    } else {
                        dot_scalar(q, d, m, xs, xd, xsum)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let v = dot_scalar(q, d, m, xs, xd, xsum);
                    out[r * t + tok] = v;
                }
            }
        })
    }
}

struct Q8_1 {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<i8>,
}

/// ggml's Q8_1 quantizer (f16 scale, f16 scaled sum), as candle's `BlockQ8_1::from_float`.
fn quantize_q8_1(x: &[f32]) -> Q8_1 {
    let n = x.len() / QK;
    let mut a = Q8_1 {
        d: Vec::with_capacity(n),
        s: Vec::with_capacity(n),
        qs: Vec::with_capacity(x.len()),
    };
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |acc, v| acc.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d);
        let mut sum = 0i32;
        for v in block {
            let q = (v * id).round() as i8;
            sum += q as i32;
            a.qs.push(q);
        }
        a.d.push(d16.to_f32());
        a.s.push((f16::from_f32(sum as f32) * d16).to_f32());
    }
    a
}

fn dot_scalar(q: &[u8], d: &[f32], m: &[f32], x: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..d.len() {
        let (qb, xb) = (&q[b * 16..(b + 1) * 16], &x[b * QK..(b + 1) * QK]);
        let mut s = 0i32;
        for j in 0..16 {
            s += (qb[j] & 0x0F) as i32 * xb[j] as i32 + (qb[j] >> 4) as i32 * xb[j + 16] as i32;
        }
        acc += s as f32 * d[b] * xd[b] + m[b] * xs[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::QK;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(q: &[u8], d: &[f32], m: &[f32], x: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0.0f32;
        for b in 0..d.len() {
            // 16 bytes -> 32 nibbles: low nibbles are elements 0..16, high ones 16..32.
            let raw = _mm_loadu_si128(q.as_ptr().add(b * 16) as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            let w = _mm256_and_si256(both, low);
            let xv = _mm256_loadu_si256(x.as_ptr().add(b * QK) as *const __m256i);
            // Nibbles are unsigned, activations signed: maddubs takes them as they are.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
            let s = _mm256_set1_ps(*d.get_unchecked(b) * *xd.get_unchecked(b));
            acc = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc);
            mins += *m.get_unchecked(b) * *xs.get_unchecked(b);
        }
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h) + mins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q8_matmul::tests::candle_matmul;
    use candle_core::{Device, Tensor};

    fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 0.618 + seed).sin() * 1.3).powi(3) + 0.2)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Against candle's Q4_1 matmul on the same blocks, with two stacked parts (fused QKV).
    #[test]
    fn matches_candle_q4_1_matmul_and_stacks_rows() {
        for (r1, r2, cols, t) in [(8, 5, 64, 1), (40, 24, 576, 3), (17, 16, 128, 6)] {
            let (a, b) = (matrix(r1, cols, 0.3), matrix(r2, cols, 0.9));
            let qa = QTensor::quantize(&a, GgmlDType::Q4_1).unwrap();
            let qb = QTensor::quantize(&b, GgmlDType::Q4_1).unwrap();
            let ours = Q4Matrix::from_qtensors(&[&qa, &qb]).unwrap();
            assert_eq!(ours.rows(), r1 + r2);
            let x = matrix(t, cols, 2.1);
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let got = ours.matmul(&xv, t);
            let want_a = candle_matmul(qa, &x);
            let want_b = candle_matmul(qb, &x);
            let scale = want_a
                .iter()
                .chain(&want_b)
                .fold(0.0f32, |m, v| m.max(v.abs()));
            for tok in 0..t {
                let want = want_a[tok * r1..(tok + 1) * r1]
                    .iter()
                    .chain(&want_b[tok * r2..(tok + 1) * r2]);
                for (i, w) in want.enumerate() {
                    let g = got[tok * (r1 + r2) + i];
                    assert!((g - w).abs() <= 1e-5 * scale, "t={tok} row {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn scalar_and_avx2_agree() {
        let q = QTensor::quantize(&matrix(4, 256, 0.1), GgmlDType::Q4_1).unwrap();
        let m = Q4Matrix::from_qtensors(&[&q]).unwrap();
        let x: Vec<f32> = matrix(1, 256, 1.5)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let a = quantize_q8_1(&x);
        let nb = 256 / QK;
        let slow = dot_scalar(&m.qs[..nb * 16], &m.d[..nb], &m.m[..nb], &a.qs, &a.d, &a.s);
        if has_avx2_fma() {
            let fast =
                unsafe { avx2::dot(&m.qs[..nb * 16], &m.d[..nb], &m.m[..nb], &a.qs, &a.d, &a.s) };
            assert!(
                (fast - slow).abs() <= 1e-4 * slow.abs().max(1.0),
                "{fast} vs {slow}"
            );
        }
    }
}
