//! Activations to int8 per 32-element block, as ggml's Q8_0 / Q8_1 and exactly as candle computes
//! them (scale = amax / 127 stored as f16, values `round(x / scale)` with halves away from zero),
//! so our kernels' results match candle's matmuls.
//!
//! Why its own vector code: the scalar loop (a saturating cast and a libm `round` per element)
//! was 4.4% of the engine's time at 32 streams, as much as all of the attention's `exp`.

use half::f16;

pub(crate) const QK: usize = 32;

/// One activation matrix, block by block: int8 values, f32 scales (the f16 value), and for
/// Q8_1 the f16-rounded `scale * Σq` of each block.
pub(crate) struct Quantized {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

/// Quantizes `x` (a whole number of blocks); `sums` adds Q8_1's per-block sums.
pub(crate) fn quantize(x: &[f32], sums: bool) -> Quantized {
    assert_eq!(x.len() % QK, 0, "whole blocks");
    let n = x.len() / QK;
    let mut out = Quantized {
        d: Vec::with_capacity(n),
        s: Vec::with_capacity(if sums { n } else { 0 }),
        qs: vec![0; x.len()],
    };
    let avx2 = crate::cpu::has_avx2_fma();
    for (block, q) in x.chunks_exact(QK).zip(out.qs.chunks_exact_mut(QK)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected at run time; both slices are one block long.
        let (scale, sum) = if avx2 {
            unsafe { avx2::block(block, q) }
        } else {
            block_scalar(block, q)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (scale, sum) = {
            let _ = avx2;
            block_scalar(block, q)
        };
        let d16 = f16::from_f32(scale);
        out.d.push(d16.to_f32());
        if sums {
            out.s.push((f16::from_f32(sum as f32) * d16).to_f32());
        }
    }
    out
}

/// Returns the block's (unrounded) scale and the sum of its int8 values.
fn block_scalar(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0;
    for (v, q) in x.iter().zip(q) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (scale, sum)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, v| {
            _mm256_max_ps(m, _mm256_andnot_ps(sign, *v))
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        // round() rounds halves away from zero, which no rounding mode does: truncate, then
        // step one away from zero where the (exact) remainder is at least a half.
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            let p = _mm256_mul_ps(v[k], inv);
            let t = _mm256_round_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
            let away = _mm256_or_ps(_mm256_and_ps(p, sign), one);
            let up = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
            _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, away)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        // Saturating packs to bytes; they interleave 4-value groups across the two lanes,
        // which the permute puts back in order.
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let bytes = _mm256_permutevar8x32_epi32(packed, order);
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
        (scale, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector path against the scalar one, bit for bit: random blocks, zeros, and blocks
    /// whose values land exactly on halves (the rounding rule's only hard case).
    #[test]
    fn vector_and_scalar_quantizers_agree() {
        if !crate::cpu::has_avx2_fma() {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|b| {
                (0..QK)
                    .map(|i| ((b * QK + i) as f32 * 0.7131).sin() * (1.0 + b as f32))
                    .collect()
            })
            .collect();
        blocks.push(vec![0.0; QK]);
        // amax 127 makes the scale exactly 1: every x.5 is a tie, of either sign.
        blocks.push(
            (0..QK)
                .map(|i| {
                    if i == 0 {
                        127.0
                    } else {
                        (i as f32 - 16.0) + 0.5
                    }
                })
                .collect(),
        );
        for x in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let slow = block_scalar(x, &mut a);
            // SAFETY: AVX2 and FMA detected above; one block each.
            let fast = unsafe { avx2::block(x, &mut b) };
            assert_eq!(fast, slow, "{x:?}");
            assert_eq!(a, b, "{x:?}");
        }
    }
}
