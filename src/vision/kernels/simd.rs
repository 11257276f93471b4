//! The few vector operations the kernels use, once per instruction set.
//!
//! The kernels are written once, generic over [`F32s`], and instantiated inside one
//! function per instruction set that carries the matching `#[target_feature]`: every
//! method here is `#[inline(always)]`, so the intrinsics end up inlined into a function
//! compiled for that set (a call per intrinsic would cost more than the arithmetic).

/// A vector of `LANES` f32.
pub(crate) trait F32s: Copy {
    const LANES: usize;
    /// # Safety
    /// The CPU has the instruction set of the implementation.
    unsafe fn splat(v: f32) -> Self;
    /// # Safety
    /// `p` is valid for reading `LANES` f32 (no alignment needed).
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` is valid for writing `LANES` f32 (no alignment needed).
    unsafe fn store(self, p: *mut f32);
    /// `self * b + acc`, fused where the instruction set fuses.
    ///
    /// # Safety
    /// As [`F32s::splat`].
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self;
    /// `min(max(self, lo), hi)`.
    ///
    /// # Safety
    /// As [`F32s::splat`].
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self;
}

/// Plain f32 (one lane): the fallback on any CPU, and the reference the vector versions
/// are tested against.
#[derive(Clone, Copy)]
pub(crate) struct Scalar(f32);

impl F32s for Scalar {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Scalar(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees one readable f32 at p.
        Scalar(unsafe { p.read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees one writable f32 at p.
        unsafe { p.write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // Not f32::mul_add: without an FMA unit that is a libm call per tap.
        Scalar(self.0 * b.0 + acc.0)
    }
    #[inline(always)]
    unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
        Scalar(self.0.max(lo.0).min(hi.0))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::Avx2Fma;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::F32s;

    /// 8 lanes of AVX2 with FMA (Haswell and later, Zen).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2Fma(__m256);

    impl F32s for Avx2Fma {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: the caller guarantees AVX.
            Avx2Fma(unsafe { _mm256_set1_ps(v) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees AVX and 8 readable f32 at p.
            Avx2Fma(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller guarantees AVX and 8 writable f32 at p.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
            // SAFETY: the caller guarantees FMA.
            Avx2Fma(unsafe { _mm256_fmadd_ps(self.0, b.0, acc.0) })
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
            // SAFETY: the caller guarantees AVX.
            Avx2Fma(unsafe { _mm256_min_ps(_mm256_max_ps(self.0, lo.0), hi.0) })
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm64::Neon;

#[cfg(target_arch = "aarch64")]
mod arm64 {
    use std::arch::aarch64::*;

    use super::F32s;

    /// 4 lanes of AdvSIMD, part of every aarch64 CPU.
    #[derive(Clone, Copy)]
    pub(crate) struct Neon(float32x4_t);

    impl F32s for Neon {
        const LANES: usize = 4;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: NEON is in the aarch64 baseline.
            Neon(unsafe { vdupq_n_f32(v) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 4 readable f32 at p; vld1q has no alignment
            // requirement beyond the element's.
            Neon(unsafe { vld1q_f32(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller guarantees 4 writable f32 at p.
            unsafe { vst1q_f32(p, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
            // SAFETY: NEON is in the aarch64 baseline. vfmaq_f32(a, b, c) = a + b * c.
            Neon(unsafe { vfmaq_f32(acc.0, self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn clamp(self, lo: Self, hi: Self) -> Self {
            // SAFETY: NEON is in the aarch64 baseline.
            Neon(unsafe { vminq_f32(vmaxq_f32(self.0, lo.0), hi.0) })
        }
    }
}
