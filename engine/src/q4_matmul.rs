//! Q4_1 x Q8_1 matmul on the GGUF file's own 4-bit blocks.
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

use crate::cpu::has_avx2_fma;
use crate::q8_matmul::by_row_tiles;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use crate::quantize::QK;

pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    /// Per block: d, m.
    d: Vec<f32>,
    m: Vec<f32>,
    /// `m` again for each group of 4 rows as `[block][row in group]`, so one vector
    /// instruction adds four rows' minimum terms.
    m4: Vec<f32>,
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
            m4: vec![],
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
        let nb = out.cols / QK;
        for g in 0..out.rows / 4 {
            for b in 0..nb {
                out.m4.extend((0..4).map(|i| out.m[(4 * g + i) * nb + b]));
            }
        }
        Ok(out)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Appends row `r` dequantized as candle does (`q as f32 * d + m`).
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        let nb = self.cols / QK;
        let mut q = [0u8; QK];
        for b in r * nb..(r + 1) * nb {
            unpack_row(&self.qs[b * 16..(b + 1) * 16], &mut q);
            out.extend(q.iter().map(|&v| v as f32 * self.d[b] + self.m[b]));
        }
    }

    /// `x` is `[t, cols]`; returns `[t, rows]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.cols, "activation shape");
        let (cols, nb) = (self.cols, self.cols / QK);
        let xa = crate::quantize::quantize(x, true);
        let avx2 = has_avx2_fma();
        // Small steps read the nibbles straight from the packed blocks (bandwidth-bound: one
        // pass over the weights); larger ones unpack each tile once and reuse it per token.
        let packed = avx2 && t <= PACKED_MAX_TOKENS;
        by_row_tiles(self.rows, t, |r0, out| {
            let nr = out.len() / t;
            TILE.with_borrow_mut(|tile| {
                let (w, width): (&[u8], usize) = if packed {
                    (&self.qs[r0 * nb * 16..(r0 + nr) * nb * 16], nb * 16)
                } else {
                    tile.resize(nr * cols, 0);
                    for (r, dst) in tile.chunks_exact_mut(cols).enumerate() {
                        let row = r0 + r;
                        unpack_row(&self.qs[row * nb * 16..(row + 1) * nb * 16], dst);
                    }
                    (tile, cols)
                };
                let row = |r: usize| Row {
                    q: &w[r * width..(r + 1) * width],
                    d: &self.d[(r0 + r) * nb..(r0 + r + 1) * nb],
                    m: &self.m[(r0 + r) * nb..(r0 + r + 1) * nb],
                };
                let act = |tok: usize| Act {
                    q: &xa.qs[tok * cols..(tok + 1) * cols],
                    d: &xa.d[tok * nb..(tok + 1) * nb],
                    s: &xa.s[tok * nb..(tok + 1) * nb],
                };
                // Rows outer, tokens inner: a group's slices are built once per step, not once
                // per token (that bookkeeping was 7% of the engine's time at 32 streams).
                let mut r = 0;
                while r + 4 <= nr {
                    let rows = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                    let g = (r0 + r) / 4;
                    let m4 = &self.m4[g * nb * 4..(g + 1) * nb * 4];
                    for tok in 0..t {
                        let v = dot4(&rows, m4, &act(tok), avx2, packed);
                        for (i, v) in v.into_iter().enumerate() {
                            out[(r + i) * t + tok] = v;
                        }
                    }
                    r += 4;
                }
                for r in r..nr {
                    let one = [row(r)];
                    for tok in 0..t {
                        out[r * t + tok] = dot4(&one, &[], &act(tok), avx2, packed)[0];
                    }
                }
            })
        })
    }
}

/// Steps of at most this many tokens skip the unpacked tile.
const PACKED_MAX_TOKENS: usize = 2;

thread_local! {
    /// One row tile of unpacked weights (one byte per element) per rayon worker.
    static TILE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// 16 bytes per block -> 32 elements in order: low nibbles are 0..16, high ones 16..32.
fn unpack_row(packed: &[u8], out: &mut [u8]) {
    for (src, dst) in packed.chunks_exact(16).zip(out.chunks_exact_mut(QK)) {
        for j in 0..16 {
            dst[j] = src[j] & 0x0F;
            dst[j + 16] = src[j] >> 4;
        }
    }
}

/// One weight row: 4-bit values (0..16), unpacked (a byte each) or as stored (16 bytes per
/// block), block scales and minimums.
#[derive(Clone, Copy)]
struct Row<'a> {
    q: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

/// One activation row in Q8_1: int8 values, block scales, scaled block sums.
struct Act<'a> {
    q: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

/// Up to four rows against one activation row. Every row gets the same operations in the same
/// order whatever it is grouped with, so a token's result never depends on the step's size.
/// `packed` (AVX2 only) says the rows hold the stored blocks, unpacked in registers to the same
/// vectors, so both layouts give the same bits. `m4` is the group's interleaved minimums when
/// `N` is 4 (empty otherwise).
fn dot4<const N: usize>(
    rows: &[Row; N],
    m4: &[f32],
    x: &Act,
    avx2: bool,
    packed: bool,
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA detected at run time; row and activation lengths match by shape.
        return unsafe {
            if packed {
                avx2::dot::<N, true>(rows, m4, x)
            } else {
                avx2::dot::<N, false>(rows, m4, x)
            }
        };
    }
    let _ = m4;
    assert!(!packed && !avx2, "the packed layout needs AVX2");
    std::array::from_fn(|i| dot_scalar(&rows[i], x))
}

/// ggml's order: Σ_b d_w·d_x·Σ(q_w·q_x) first, the minimum terms Σ_b m_w·s_x added at the end,
/// here as one fused multiply-add per block in block order (what one vector lane does for a
/// group of four rows).
#[inline(always)]
fn mins(r: &Row, x: &Act) -> f32 {
    r.m.iter()
        .zip(x.s)
        .fold(0.0f32, |a, (m, s)| m.mul_add(*s, a))
}

fn dot_scalar(r: &Row, x: &Act) -> f32 {
    // Eight lanes, as the AVX2 path, so both give the same sums.
    let mut acc = [0.0f32; 8];
    for (b, (wb, xb)) in r.q.chunks_exact(QK).zip(x.q.chunks_exact(QK)).enumerate() {
        let s = r.d[b] * x.d[b];
        for (lane, a) in acc.iter_mut().enumerate() {
            let p: i32 = (0..4)
                .map(|k| wb[lane * 4 + k] as i32 * xb[lane * 4 + k] as i32)
                .sum();
            *a = s.mul_add(p as f32, *a);
        }
    }
    hsum8(&acc) + mins(r, x)
}

/// The AVX2 path's horizontal sum order: halves, then pairs, then the last two.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let (h0, h1) = (h[0] + h[2], h[1] + h[3]);
    h0 + h1
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{mins, Act, Row, QK};
    use std::arch::x86_64::*;

    /// Block `b`'s 32 weights as bytes, from the unpacked row or from the stored nibbles.
    #[inline(always)]
    unsafe fn weights<const PACKED: bool>(q: &[u8], b: usize) -> __m256i {
        if PACKED {
            let raw = _mm_loadu_si128(q.as_ptr().add(b * 16) as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        } else {
            _mm256_loadu_si256(q.as_ptr().add(b * QK) as *const __m256i)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<const N: usize, const PACKED: bool>(
        rows: &[Row; N],
        m4: &[f32],
        x: &Act,
    ) -> [f32; N] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let grouped = N == 4;
        let mut acc_min = _mm_setzero_ps();
        for b in 0..x.d.len() {
            let xv = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
            let xd = *x.d.get_unchecked(b);
            if grouped {
                let m = _mm_loadu_ps(m4.as_ptr().add(b * 4));
                acc_min = _mm_fmadd_ps(m, _mm_set1_ps(*x.s.get_unchecked(b)), acc_min);
            }
            for i in 0..N {
                let r = &rows[i];
                let w = weights::<PACKED>(r.q, b);
                // Weights are unsigned nibbles, activations signed: maddubs takes them as
                // they are, and 2 * 15 * 127 cannot saturate its 16-bit sums.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                let s = _mm256_set1_ps(*r.d.get_unchecked(b) * xd);
                acc[i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[i]);
            }
        }
        // A plain loop, not a closure over `acc`: capturing it kept the accumulators in memory
        // (a store per block per row).
        let mut m = [0.0f32; 4];
        _mm_storeu_ps(m.as_mut_ptr(), acc_min);
        let mut out = [0.0f32; N];
        for i in 0..N {
            out[i] = hsum(acc[i]) + if grouped { m[i] } else { mins(&rows[i], x) };
        }
        out
    }

    #[inline(always)]
    unsafe fn hsum(a: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
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

    /// The scalar fallback reproduces the AVX2 path's lanes and sum order exactly.
    #[test]
    fn scalar_and_avx2_agree_bit_for_bit() {
        let cols = 256;
        let q = QTensor::quantize(&matrix(4, cols, 0.1), GgmlDType::Q4_1).unwrap();
        let m = Q4Matrix::from_qtensors(&[&q]).unwrap();
        let x: Vec<f32> = matrix(1, cols, 1.5)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let a = crate::quantize::quantize(&x, true);
        let act = Act {
            q: &a.qs,
            d: &a.d,
            s: &a.s,
        };
        let nb = cols / QK;
        let mut w = vec![0u8; 4 * cols];
        for (r, dst) in w.chunks_exact_mut(cols).enumerate() {
            unpack_row(&m.qs[r * nb * 16..(r + 1) * nb * 16], dst);
        }
        let rows: [Row; 4] = std::array::from_fn(|r| Row {
            q: &w[r * cols..(r + 1) * cols],
            d: &m.d[r * nb..(r + 1) * nb],
            m: &m.m[r * nb..(r + 1) * nb],
        });
        let slow = dot4(&rows, &[], &act, false, false);
        let avx2 = has_avx2_fma();
        let m4 = &m.m4[..nb * 4];
        assert_eq!(dot4(&rows, m4, &act, avx2, false), slow);
        // A row alone gives what it gives in a group of four.
        assert_eq!(dot4(&[rows[2]], &[], &act, avx2, false)[0], slow[2]);
        if avx2 {
            let packed: [Row; 4] = std::array::from_fn(|r| Row {
                q: &m.qs[r * nb * 16..(r + 1) * nb * 16],
                ..rows[r]
            });
            assert_eq!(dot4(&packed, m4, &act, true, true), slow);
        }
    }

    /// A token's outputs do not depend on how many tokens share the step (with AVX2, one
    /// token takes the packed path and nine the unpacked tile).
    #[test]
    fn batch_invariant() {
        let (rows, cols, t) = (37, 192, 9);
        let q = QTensor::quantize(&matrix(rows, cols, 0.4), GgmlDType::Q4_1).unwrap();
        let m = Q4Matrix::from_qtensors(&[&q]).unwrap();
        let x: Vec<f32> = matrix(t, cols, 0.8)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let all = m.matmul(&x, t);
        for tok in 0..t {
            let one = m.matmul(&x[tok * cols..(tok + 1) * cols], 1);
            assert_eq!(one, all[tok * rows..(tok + 1) * rows], "token {tok}");
        }
    }

    /// Embedding lookups read rows of the output matrix: the same numbers as candle's table.
    #[test]
    fn dequantized_rows_equal_candles_dequantization() {
        let q = QTensor::quantize(&matrix(5, 96, 0.5), GgmlDType::Q4_1).unwrap();
        let m = Q4Matrix::from_qtensors(&[&q]).unwrap();
        crate::q8_matmul::tests::assert_rows_match_candle(&q, |r, out| m.dequantize_row(r, out));
    }
}
