//! Our one hand-written kernel: a batched Q8_0 matmul, `y[t, rows] = x[t, cols] · Wᵀ`.
//!
//! Why: candle's quantized matmul computes each (token, row) dot product independently, so a
//! batch of 32 tokens streams the weights 32 times and decode throughput stays flat with batch
//! size (measured: 71 tokens/s at 8 streams vs 78 at 1; see docs/bench.md). Here a tile of
//! weight rows is loaded once into L1 and reused for every token of the step, so batched decode
//! becomes compute-bound instead of bandwidth-bound.
//!
//! Numerics follow ggml's Q8_0 × Q8_0 exactly (weights: 32 int8 + one f16 scale per block,
//! as candle stores them; activations quantized per 32-block the same way), so results match
//! candle's to float summation order; `tests` checks that. AVX2+FMA at run time, scalar
//! fallback otherwise.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::cpu::has_avx2_fma;
use crate::quantize::QK;
/// Weight rows per task: 16 rows of a 576-wide matrix are ~10 KB, comfortably L1-resident.
const ROW_TILE: usize = 16;

/// A Q8_0 matrix in structure-of-arrays form: aligned int8 rows and f32 block scales.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    qs: Vec<i8>,
}

#[derive(Debug, thiserror::Error)]
pub enum Q8Error {
    #[error("expected a 2-D Q8_0 tensor, got {0:?} {1:?}")]
    Shape(GgmlDType, Vec<usize>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Q8Matrix {
    /// Takes candle's Q8_0 blocks as they are (bit-identical weights).
    pub fn from_qtensor(q: &QTensor) -> Result<Self, Q8Error> {
        let dims = q.shape().dims().to_vec();
        if q.dtype() != GgmlDType::Q8_0 || dims.len() != 2 || !dims[1].is_multiple_of(QK) {
            return Err(Q8Error::Shape(q.dtype(), dims));
        }
        let (rows, cols) = (dims[0], dims[1]);
        let raw = q.data()?;
        let nblocks = rows * cols / QK;
        assert_eq!(raw.len(), nblocks * (2 + QK), "Q8_0 block size");
        let mut scales = Vec::with_capacity(nblocks);
        let mut qs = Vec::with_capacity(rows * cols);
        for b in raw.chunks_exact(2 + QK) {
            scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            qs.extend(b[2..].iter().map(|&v| v as i8));
        }
        Ok(Self {
            rows,
            cols,
            scales,
            qs,
        })
    }

    /// Quantizes an f32 `[rows, cols]` tensor with candle's Q8_0 quantizer.
    pub fn quantize(t: &candle_core::Tensor) -> Result<Self, Q8Error> {
        Self::from_qtensor(&QTensor::quantize(t, GgmlDType::Q8_0)?)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Appends row `r` dequantized as candle does (`q as f32 * d`).
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        let (q, d) = self.row(r);
        for (qb, d) in q.chunks_exact(QK).zip(d) {
            out.extend(qb.iter().map(|&v| v as f32 * d));
        }
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` is `[t, cols]` row-major; returns `[t, rows]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        assert_eq!(x.len(), t * self.cols, "activation shape");
        let nb = self.cols / QK;
        let crate::quantize::Quantized { d: xd, qs: xq, .. } = crate::quantize::quantize(x, false);
        let avx2 = has_avx2_fma();
        by_row_tiles(self.rows, t, |r0, out| {
            let nr = out.len() / t;
            let act = |tok: usize| {
                (
                    &xq[tok * self.cols..(tok + 1) * self.cols],
                    &xd[tok * nb..(tok + 1) * nb],
                )
            };
            // Rows outer, tokens inner: each group's slices are built once per step.
            let mut r = 0;
            while r + 4 <= nr {
                let rows = [
                    self.row(r0 + r),
                    self.row(r0 + r + 1),
                    self.row(r0 + r + 2),
                    self.row(r0 + r + 3),
                ];
                for tok in 0..t {
                    let (xs, xds) = act(tok);
                    let d = Self::dot4(rows, xs, xds, avx2);
                    for (i, v) in d.iter().enumerate() {
                        out[(r + i) * t + tok] = *v;
                    }
                }
                r += 4;
            }
            for r in r..nr {
                let (w, wd) = self.row(r0 + r);
                for tok in 0..t {
                    let (xs, xds) = act(tok);
                    out[r * t + tok] = dot_scalar(w, wd, xs, xds);
                }
            }
        })
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let nb = self.cols / QK;
        (
            &self.qs[r * self.cols..(r + 1) * self.cols],
            &self.scales[r * nb..(r + 1) * nb],
        )
    }

    fn dot4(rows: [(&[i8], &[f32]); 4], x: &[i8], xd: &[f32], avx2: bool) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA were detected at run time; slices are in bounds by shape.
            return unsafe { avx2::dot4(rows, x, xd) };
        }
        let _ = avx2;
        rows.map(|(w, wd)| dot_scalar(w, wd, x, xd))
    }
}

/// Runs `f(first_row, slab)` over tiles of `ROW_TILE` weight rows in parallel, each slab laid
/// out `[row][token]` so every task owns contiguous memory, and returns the result as
/// `[token][row]`.
pub(crate) fn by_row_tiles(
    rows: usize,
    t: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut yt = vec![0.0f32; rows * t];
    yt.par_chunks_mut(ROW_TILE * t)
        .enumerate()
        .for_each(|(tile, out)| f(tile * ROW_TILE, out));
    if t == 1 {
        return yt;
    }
    // Transpose slab by slab: each slab is small enough to stay in cache while its rows are
    // scattered, and every token's 16 outputs land in one cache line (a plain strided
    // transpose of a 3072 x 512 prefill step cost 7% of the engine's time).
    let mut y = vec![0.0f32; t * rows];
    for (tile, slab) in yt.chunks(ROW_TILE * t).enumerate() {
        let (r0, nr) = (tile * ROW_TILE, slab.len() / t);
        for tok in 0..t {
            let dst = &mut y[tok * rows + r0..tok * rows + r0 + nr];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = slab[i * t + tok];
            }
        }
    }
    y
}

fn dot_scalar(w: &[i8], wd: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (b, (wb, xb)) in w.chunks_exact(QK).zip(x.chunks_exact(QK)).enumerate() {
        let s: i32 = wb.iter().zip(xb).map(|(a, c)| *a as i32 * *c as i32).sum();
        acc += wd[b] * xd[b] * s as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::QK;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Four weight rows against one quantized activation row, sharing each activation load.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(rows: [(&[i8], &[f32]); 4], x: &[i8], xd: &[f32]) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..xd.len() {
            let xv = _mm256_loadu_si256(x.as_ptr().add(b * QK) as *const __m256i);
            // maddubs multiplies unsigned by signed: move x's sign onto w, use |x|.
            let ax = _mm256_sign_epi8(xv, xv);
            for i in 0..4 {
                let (w, wd) = rows[i];
                let wv = _mm256_loadu_si256(w.as_ptr().add(b * QK) as *const __m256i);
                let sw = _mm256_sign_epi8(wv, xv);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), ones);
                let s = _mm256_set1_ps(*wd.get_unchecked(b) * *xd.get_unchecked(b));
                acc[i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[i]);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    /// candle's own quantized matmul: the oracle for our kernels.
    pub(crate) fn candle_matmul(q: QTensor, x: &Tensor) -> Vec<f32> {
        let y = QMatMul::from_qtensor(q).unwrap().forward(x).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 0.618 + seed).sin() * 1.7).powi(3))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Our batched kernel against candle's Q8_0 matmul on bit-identical weights, for batch
    /// sizes that exercise the 4-row path, the remainder rows and partial tiles.
    #[test]
    fn matches_candle_q8_0_matmul() {
        for (rows, cols, t) in [(37, 64, 1), (64, 576, 3), (150, 96, 8), (960, 576, 33)] {
            let w = matrix(rows, cols, 0.3);
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let ours = Q8Matrix::from_qtensor(&q).unwrap();
            let x = matrix(t, cols, 1.1);
            let want = candle_matmul(q, &x);
            let got = ours.matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), t);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "({rows}x{cols}, t={t}) [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn scalar_and_avx2_paths_agree() {
        let w = matrix(8, 128, 0.7);
        let m = Q8Matrix::quantize(&w).unwrap();
        let x: Vec<f32> = matrix(1, 128, 2.0)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let crate::quantize::Quantized { d: xd, qs: xq, .. } = crate::quantize::quantize(&x, false);
        let rows = [m.row(0), m.row(1), m.row(2), m.row(3)];
        let fast = Q8Matrix::dot4(rows, &xq, &xd, has_avx2_fma());
        let slow = Q8Matrix::dot4(rows, &xq, &xd, false);
        for (a, b) in fast.iter().zip(slow) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// Embedding lookups read rows of the output matrix: the same numbers as candle's table.
    #[test]
    fn dequantized_rows_equal_candles_dequantization() {
        let q = QTensor::quantize(&matrix(5, 96, 0.5), GgmlDType::Q8_0).unwrap();
        let m = Q8Matrix::from_qtensor(&q).unwrap();
        assert_rows_match_candle(&q, |r, out| m.dequantize_row(r, out));
    }

    /// Every row `dequantize_row` gives equals candle's dequantization of `q`, bit for bit.
    pub(crate) fn assert_rows_match_candle(
        q: &QTensor,
        dequantize_row: impl Fn(usize, &mut Vec<f32>),
    ) {
        let (rows, cols) = q.shape().dims2().unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for r in 0..rows {
            let mut got = vec![];
            dequantize_row(r, &mut got);
            assert_eq!(got, want[r * cols..(r + 1) * cols], "row {r}");
        }
    }
}
