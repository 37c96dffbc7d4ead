//! `exp` over a slice, eight lanes at a time, for the softmax in attention and for SiLU.
//!
//! Why: libm's scalar `expf` was 4.5% of the engine's time at 32 streams, one call per
//! (query head, key) and per FFN activation. This is the Cephes single-precision polynomial
//! (as in the avx_mathfun / ggml lineage): relative error within a few ulp of libm, which the
//! reference test's logit tolerance covers. Without AVX2 it is libm.

/// Replaces every `x` with `e^x`.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::exp_in_place(xs) };
    }
    xs.iter_mut().for_each(|x| *x = x.exp());
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = exp8(_mm256_loadu_ps(c.as_ptr()));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [0.0f32; 8];
            buf[..rest.len()].copy_from_slice(rest);
            let v = exp8(_mm256_loadu_ps(buf.as_ptr()));
            _mm256_storeu_ps(buf.as_mut_ptr(), v);
            rest.copy_from_slice(&buf[..rest.len()]);
        }
    }

    /// e^x = 2^n · e^r with n = round(x·log2 e) and |r| ≤ ln2/2, e^r by a degree-6 polynomial.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-88.376_26)),
            _mm256_set1_ps(88.376_26),
        );
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        // ln 2 in two parts, so x - n·ln2 loses nothing.
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_2e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
        _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_a_few_ulp() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.043).collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = x.exp();
            assert!(
                (g - want).abs() <= 4.0 * f32::EPSILON * want,
                "exp({x}) = {g}, libm {want}"
            );
        }
        // The tails softmax and SiLU hit: far below zero is (almost) zero, never NaN.
        let mut tail = [-1e4f32, -100.0, 0.0, 3.0, -87.0];
        exp_in_place(&mut tail);
        assert!(
            tail[0] >= 0.0 && tail[0] < 1e-37 && tail[1] < 1e-37,
            "{tail:?}"
        );
        assert_eq!(tail[2], 1.0);
    }
}
