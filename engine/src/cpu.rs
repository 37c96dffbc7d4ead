//! Which vector instructions this CPU has, asked once at run time: the kernels, the quantizer,
//! `exp` and attention each have an AVX2+FMA path and a portable one, and the binary itself
//! targets baseline x86-64 so that it runs anywhere.

/// AVX2 and FMA both present (std caches the CPUID answer).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// F16C (half-precision conversions), which every AVX2 CPU we know of also has.
pub(crate) fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
