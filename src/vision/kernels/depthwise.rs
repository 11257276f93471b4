//! Depthwise 2-D convolution of one channel plane, f32, with bias and a clamp (ReLU,
//! ReLU6 or none) fused: what MobileNetV2 and EfficientNet-Lite spend most of their
//! time in, and what tract runs with AVX but no FMA on x86_64 and, for stride 2, not
//! vectorised at all.
//!
//! Layout: NCHW, the models' own, so no transposition is paid before or after. One plane
//! is copied once into a zero-bordered scratch, split by column phase when the stride
//! is 2 (even columns, then odd ones, de-interleaved in one pass): every tap then reads
//! `LANES` consecutive floats for `LANES` consecutive outputs, with no bounds checks and
//! no gathers, and the padding costs nothing in the inner loop. A block computes two
//! output rows of four vectors each, with its eight accumulators in registers across
//! all taps: the FMA latency is hidden, each input vector loaded serves both rows, and
//! the output is written once. Measured in guest instructions on a Cortex-A72 over the
//! SSD's and EfficientNet's layer shapes: the plane split and the row pairs took the
//! kernel from 934 to 651 million for the same work (stride 2 was three quarters copy).

use super::simd::{F32s, Scalar};

/// The instruction set a kernel runs with, chosen once at run time from the CPU (as
/// tract chooses its own matrix kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust: any CPU.
    Generic,
    /// x86_64 with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// aarch64 AdvSIMD.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// 32-bit ARM NEON (every Raspberry Pi from the 2 on), in assembly: Rust's
    /// intrinsics for it are not stable.
    #[cfg(target_arch = "arm")]
    Armv7Neon,
}

impl Isa {
    /// The best instruction set this CPU offers.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2Fma;
        }
        #[cfg(target_arch = "aarch64")]
        return Isa::Neon;
        // The armv7 build is compiled with NEON (.cargo/config.toml), but rustc does not
        // expose the still unstable `neon` feature to cfg, and the CPU is what counts:
        // the kernel's HWCAP says (the emulated CPU's under qemu, unlike /proc/cpuinfo).
        #[cfg(target_arch = "arm")]
        {
            const HWCAP_NEON: libc::c_ulong = 1 << 12;
            // SAFETY: getauxval only reads the auxiliary vector the kernel gave the
            // process; AT_HWCAP is always present on Linux.
            if unsafe { libc::getauxval(libc::AT_HWCAP) } & HWCAP_NEON != 0 {
                return Isa::Armv7Neon;
            }
        }
        #[allow(unreachable_code)]
        Isa::Generic
    }

    /// Short name, part of the kernel names `shelfwatch bench` and the platform tests
    /// print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2_fma",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            #[cfg(target_arch = "arm")]
            Isa::Armv7Neon => "armv7neon",
        }
    }
}

/// The shape of one depthwise convolution, per channel plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Input plane height and width.
    pub h: usize,
    pub w: usize,
    /// Output plane height and width.
    pub oh: usize,
    pub ow: usize,
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    /// Strides (vertical, horizontal), at least 1.
    pub sh: usize,
    pub sw: usize,
    /// Zero rows above and columns left of the input; those below and right follow from
    /// the output size.
    pub pad_top: usize,
    pub pad_left: usize,
}

impl Geometry {
    /// Padded rows the output reads.
    fn rows(&self) -> usize {
        (self.oh - 1) * self.sh + self.kh
    }

    /// Width of one column phase in the scratch: every vector load of the last block
    /// (rounded up to whole vectors) stays inside it.
    fn phase_width(&self, lanes: usize) -> usize {
        self.ow.div_ceil(lanes) * lanes + (self.kw - 1) / self.sw + 1
    }

    /// Scratch floats [`plane`] needs for this geometry (at most 8 lanes).
    pub fn scratch_len(&self) -> usize {
        self.rows() * self.sw * self.phase_width(8)
    }
}

/// The clamp fused after the convolution: `lo = 0, hi = 6` is ReLU6, `lo = 0,
/// hi = inf` ReLU, infinities on both sides none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    pub lo: f32,
    pub hi: f32,
}

impl Clamp {
    pub const NONE: Clamp = Clamp {
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };
}

/// Convolves one channel plane: `out[y][x] = clamp(bias + sum_{ky,kx} weights[ky][kx] *
/// input[y*sh + ky - pad_top][x*sw + kx - pad_left])`, outside the input reading 0.
///
/// `input` is `h * w`, `weights` `kh * kw`, `out` `oh * ow`, all row-major; `scratch`
/// is resized as needed and can be reused across calls.
///
/// # Panics
/// If a slice is shorter than the geometry says, or a stride or kernel size is 0.
#[allow(clippy::too_many_arguments)]
pub fn plane(
    isa: Isa,
    g: &Geometry,
    input: &[f32],
    weights: &[f32],
    bias: f32,
    clamp: Clamp,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert!(g.sh >= 1 && g.sw >= 1 && g.kh >= 1 && g.kw >= 1 && g.oh >= 1 && g.ow >= 1);
    assert!(input.len() >= g.h * g.w, "input plane too short");
    assert!(weights.len() >= g.kh * g.kw, "kernel too short");
    assert!(out.len() >= g.oh * g.ow, "output plane too short");
    if scratch.len() < g.scratch_len() {
        scratch.resize(g.scratch_len(), 0.0);
    }
    match isa {
        // SAFETY: Generic needs no CPU feature; the slices were checked above.
        Isa::Generic => unsafe { run::<Scalar>(g, input, weights, bias, clamp, out, scratch) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma is only ever made by Isa::detect on a CPU with both, or by
        // a test that checked the same.
        Isa::Avx2Fma => unsafe { run_avx2_fma(g, input, weights, bias, clamp, out, scratch) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline; the slices were checked above.
        Isa::Neon => unsafe {
            run::<super::simd::Neon>(g, input, weights, bias, clamp, out, scratch)
        },
        #[cfg(target_arch = "arm")]
        // SAFETY: the build enables NEON; the slices were checked above.
        Isa::Armv7Neon => unsafe { armv7::run(g, input, weights, bias, clamp, out, scratch) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2_fma(
    g: &Geometry,
    input: &[f32],
    weights: &[f32],
    bias: f32,
    clamp: Clamp,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    // SAFETY: this function only runs where AVX2 and FMA are present (its caller's
    // contract); the slice lengths were checked by `plane`.
    unsafe { run::<super::simd::Avx2Fma>(g, input, weights, bias, clamp, out, scratch) }
}

/// Convolves channels-last data (the layout tract's simplifications choose on some
/// targets, aarch64 among them): `input` is `h x w x c`, `weights` `kh x kw x c`,
/// `bias` `c`; writes output rows `rows` of the `oh x ow x c` result into `out`, which
/// holds exactly those rows. Vectorised over channels; the padding is skipped by
/// narrowing each output pixel's tap range, so nothing is copied.
///
/// # Panics
/// If a slice is shorter than the geometry says.
#[allow(clippy::too_many_arguments)]
pub fn hwc(
    isa: Isa,
    g: &Geometry,
    c: usize,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    clamp: Clamp,
    out: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    assert!(input.len() >= g.h * g.w * c && weights.len() >= g.kh * g.kw * c && bias.len() >= c);
    assert!(rows.end <= g.oh && out.len() >= rows.len() * g.ow * c);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2Fma is only made where AVX2 and FMA are present (see plane).
        Isa::Avx2Fma => unsafe { hwc_avx2_fma(g, c, input, weights, bias, clamp, out, rows) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is in the aarch64 baseline; the slices were checked above.
        Isa::Neon => unsafe {
            hwc_run::<super::simd::Neon>(g, c, input, weights, bias, clamp, out, rows)
        },
        // SAFETY: Scalar needs no CPU feature (armv7 too: its assembly kernel is for
        // planes); the slices were checked above.
        _ => unsafe { hwc_run::<Scalar>(g, c, input, weights, bias, clamp, out, rows) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn hwc_avx2_fma(
    g: &Geometry,
    c: usize,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    clamp: Clamp,
    out: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    // SAFETY: as `hwc`'s Avx2Fma arm.
    unsafe { hwc_run::<super::simd::Avx2Fma>(g, c, input, weights, bias, clamp, out, rows) }
}

/// # Safety
/// The CPU supports `V`; the slices are as long as `hwc` checks.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn hwc_run<V: F32s>(
    g: &Geometry,
    c: usize,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    clamp: Clamp,
    out: &mut [f32],
    rows: std::ops::Range<usize>,
) {
    let l = V::LANES;
    // SAFETY: the caller guarantees V's instruction set.
    let (lo, hi) = unsafe { (V::splat(clamp.lo), V::splat(clamp.hi)) };
    let first = rows.start;
    for oy in rows {
        // Taps inside the input: ky with 0 <= oy * sh + ky - pad_top < h.
        let top = oy * g.sh;
        let ky0 = g.pad_top.saturating_sub(top).min(g.kh);
        let ky1 = (g.h + g.pad_top).saturating_sub(top).clamp(ky0, g.kh);
        for ox in 0..g.ow {
            let left = ox * g.sw;
            let kx0 = g.pad_left.saturating_sub(left).min(g.kw);
            let kx1 = (g.w + g.pad_left).saturating_sub(left).clamp(kx0, g.kw);
            let taps = Taps {
                ky0,
                ky1,
                kx0,
                kx1,
                top,
                left,
            };
            let o = &mut out[((oy - first) * g.ow + ox) * c..][..c];
            let mut c0 = 0;
            // SAFETY (both): c0 + n * LANES <= c, every (iy, ix) is inside the input by
            // the tap ranges, and the weight and bias offsets < kh * kw * c and c.
            while c0 + 4 * l <= c {
                unsafe { hwc_block::<V, 4>(g, c, &taps, input, weights, bias, c0, lo, hi, o) };
                c0 += 4 * l;
            }
            while c0 + l <= c {
                unsafe { hwc_block::<V, 1>(g, c, &taps, input, weights, bias, c0, lo, hi, o) };
                c0 += l;
            }
            for ch in c0..c {
                let mut acc = bias[ch];
                for ky in ky0..ky1 {
                    let iy = top + ky - g.pad_top;
                    for kx in kx0..kx1 {
                        let ix = left + kx - g.pad_left;
                        acc += weights[(ky * g.kw + kx) * c + ch] * input[(iy * g.w + ix) * c + ch];
                    }
                }
                o[ch] = acc.max(clamp.lo).min(clamp.hi);
            }
        }
    }
}

/// The taps of one output pixel that fall inside the input.
struct Taps {
    ky0: usize,
    ky1: usize,
    kx0: usize,
    kx1: usize,
    top: usize,
    left: usize,
}

/// `U` vectors of channels from `c0` for one output pixel.
///
/// # Safety
/// As `hwc_run`; `c0 + U * LANES <= c`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn hwc_block<V: F32s, const U: usize>(
    g: &Geometry,
    c: usize,
    t: &Taps,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    c0: usize,
    lo: V,
    hi: V,
    o: &mut [f32],
) {
    let l = V::LANES;
    // SAFETY: c0 + U * LANES <= c for bias and o; the input and weight offsets are
    // inside by the tap ranges (the caller's contract).
    unsafe {
        let mut acc: [V; U] = std::array::from_fn(|u| V::load(bias.as_ptr().add(c0 + u * l)));
        for ky in t.ky0..t.ky1 {
            let iy = t.top + ky - g.pad_top;
            for kx in t.kx0..t.kx1 {
                let ix = t.left + kx - g.pad_left;
                let src = input.as_ptr().add((iy * g.w + ix) * c + c0);
                let wp = weights.as_ptr().add((ky * g.kw + kx) * c + c0);
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = V::load(src.add(u * l)).mul_add(V::load(wp.add(u * l)), *a);
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            a.clamp(lo, hi).store(o.as_mut_ptr().add(c0 + u * l));
        }
    }
}

/// Fills the scratch with the padded plane, split by column phase, then dispatches on
/// the kernel shape: 3x3 and 5x5 at strides 1 and 2 (all our models have) get a
/// version with every loop bound known at compile time, anything else the general one.
///
/// # Safety
/// The CPU supports `V`; `input`, `weights`, `out` and `scratch` are at least as long
/// as `g` says (see `plane`).
#[inline(always)]
unsafe fn run<V: F32s>(
    g: &Geometry,
    input: &[f32],
    weights: &[f32],
    bias: f32,
    clamp: Clamp,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let pw = g.phase_width(V::LANES);
    fill(g, pw, input, scratch);
    let s = scratch.as_ptr();
    let o = out.as_mut_ptr();
    let w = weights.as_ptr();
    // SAFETY: forwarded from the caller; `fill` wrote `rows * sw * pw` floats.
    unsafe {
        match (g.kh, g.kw, g.sh, g.sw) {
            (3, 3, 1, 1) => rows::<V, 3, 3, 1, 1>(g, pw, s, w, bias, clamp, o),
            (3, 3, 2, 2) => rows::<V, 3, 3, 2, 2>(g, pw, s, w, bias, clamp, o),
            (5, 5, 1, 1) => rows::<V, 5, 5, 1, 1>(g, pw, s, w, bias, clamp, o),
            (5, 5, 2, 2) => rows::<V, 5, 5, 2, 2>(g, pw, s, w, bias, clamp, o),
            _ => rows::<V, 0, 0, 0, 0>(g, pw, s, w, bias, clamp, o),
        }
    }
}

/// Writes the zero-padded plane into `scratch` as `rows x sw x pw`: padded row `r`,
/// column `q` lands at `(r * sw + q % sw) * pw + q / sw`. Every float of that range is
/// written once.
fn fill(g: &Geometry, pw: usize, input: &[f32], scratch: &mut [f32]) {
    let rows = g.rows();
    let row_len = g.sw * pw;
    for (r, dst) in scratch[..rows * row_len]
        .chunks_exact_mut(row_len)
        .enumerate()
    {
        let iy = r.wrapping_sub(g.pad_top);
        if iy >= g.h {
            dst.fill(0.0);
            continue;
        }
        let src = &input[iy * g.w..(iy + 1) * g.w];
        if g.sw == 1 {
            let n = g.w.min(pw.saturating_sub(g.pad_left));
            let lead = g.pad_left.min(pw);
            dst[..lead].fill(0.0);
            dst[lead..lead + n].copy_from_slice(&src[..n]);
            dst[lead + n..].fill(0.0);
        } else if g.sw == 2 {
            // Even padded columns to the first phase, odd ones to the second: a pairwise
            // copy LLVM turns into de-interleaving loads (ld2 on aarch64).
            dst.fill(0.0);
            let (p0, p1) = dst.split_at_mut(pw);
            let (mut src, mut q) = (src, g.pad_left);
            if q % 2 == 1 && !src.is_empty() {
                if q / 2 < pw {
                    p1[q / 2] = src[0];
                }
                src = &src[1..];
                q += 1;
            }
            let j = (q / 2).min(pw);
            let n = (src.len() / 2).min(pw - j);
            for ((a, b), pair) in p0[j..j + n]
                .iter_mut()
                .zip(&mut p1[j..j + n])
                .zip(src.chunks_exact(2))
            {
                *a = pair[0];
                *b = pair[1];
            }
            if src.len() % 2 == 1 && n == src.len() / 2 && j + n < pw {
                p0[j + n] = src[src.len() - 1];
            }
        } else {
            for (phase, dst) in dst.chunks_exact_mut(pw).enumerate() {
                // Phase column j reads input column j * sw + phase - pad_left: the valid
                // j form one range, so the copy loop has no branch.
                let j0 = g.pad_left.saturating_sub(phase).div_ceil(g.sw).min(pw);
                let j1 = (g.w + g.pad_left)
                    .saturating_sub(phase)
                    .div_ceil(g.sw)
                    .clamp(j0, pw);
                dst[..j0].fill(0.0);
                if j1 > j0 {
                    let first = j0 * g.sw + phase - g.pad_left;
                    for (d, s) in dst[j0..j1]
                        .iter_mut()
                        .zip(src[first..].iter().step_by(g.sw))
                    {
                        *d = *s;
                    }
                }
                dst[j1..].fill(0.0);
            }
        }
    }
}

/// The armv7 NEON kernel: the same scratch layout and blocks as the generic code, with
/// each block one assembly loop over the taps (four q-register accumulators, 16
/// outputs), since `core::arch::arm`'s NEON intrinsics are unstable.
#[cfg(target_arch = "arm")]
mod armv7 {
    use super::{fill, Clamp, Geometry, Scalar};

    /// Taps a kernel may have here (7x7 and below); larger ones take the generic code.
    const MAX_TAPS: usize = 64;

    /// # Safety
    /// As `super::run`, on a CPU with NEON.
    pub(super) unsafe fn run(
        g: &Geometry,
        input: &[f32],
        weights: &[f32],
        bias: f32,
        clamp: Clamp,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let taps = g.kh * g.kw;
        if taps > MAX_TAPS {
            // SAFETY: forwarded.
            return unsafe { super::run::<Scalar>(g, input, weights, bias, clamp, out, scratch) };
        }
        let pw = g.phase_width(4);
        fill(g, pw, input, scratch);
        // Byte offset of every tap from the first float its output row reads: the
        // same for every row and every block.
        let mut offsets = [0usize; MAX_TAPS];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                offsets[ky * g.kw + kx] = ((ky * g.sw + kx % g.sw) * pw + kx / g.sw) * 4;
            }
        }
        let params = [bias, clamp.lo, clamp.hi];
        let s = scratch.as_ptr();
        let o = out.as_mut_ptr();
        for oy in 0..g.oh {
            // SAFETY: the row and block bounds are those of `super::rows` (loads inside
            // the scratch by `phase_width`'s rounding to 4 lanes, stores inside the row
            // or the stack buffer).
            unsafe {
                let row = s.add(oy * g.sh * g.sw * pw);
                let orow = o.add(oy * g.ow);
                let mut x0 = 0;
                while x0 + 16 <= g.ow {
                    block16(
                        row.add(x0),
                        &offsets,
                        weights.as_ptr(),
                        taps,
                        &params,
                        orow.add(x0),
                    );
                    x0 += 16;
                }
                while x0 + 4 <= g.ow {
                    block4(
                        row.add(x0),
                        &offsets,
                        weights.as_ptr(),
                        taps,
                        &params,
                        orow.add(x0),
                    );
                    x0 += 4;
                }
                if x0 < g.ow {
                    let mut tail = [0f32; 4];
                    block4(
                        row.add(x0),
                        &offsets,
                        weights.as_ptr(),
                        taps,
                        &params,
                        tail.as_mut_ptr(),
                    );
                    std::ptr::copy_nonoverlapping(tail.as_ptr(), orow.add(x0), g.ow - x0);
                }
            }
        }
    }

    /// 16 outputs: `dst[i] = clamp(bias + sum_t w[t] * base[offsets[t] / 4 + i])`.
    ///
    /// # Safety
    /// NEON; `base + offsets[t]` readable for 16 floats for every tap `t < taps`
    /// (`taps >= 1`), `w` for `taps` floats, `dst` writable for 16.
    #[inline(always)]
    unsafe fn block16(
        base: *const f32,
        offsets: &[usize; MAX_TAPS],
        w: *const f32,
        taps: usize,
        params: &[f32; 3],
        dst: *mut f32,
    ) {
        // SAFETY: the caller's contract; the registers used are declared clobbered, and
        // the loop runs `taps` times over `offsets` and `w`.
        unsafe {
            core::arch::asm!(
                "vld1.32 {{d16[], d17[]}}, [{p}]!",
                "vmov q9, q8",
                "vmov q10, q8",
                "vmov q11, q8",
                "2:",
                "ldr {t}, [{offs}], #4",
                "vld1.32 {{d0[], d1[]}}, [{w}]!",
                "add {t}, {t}, {base}",
                "vld1.32 {{d2, d3, d4, d5}}, [{t}]!",
                "vld1.32 {{d6, d7, d8, d9}}, [{t}]",
                "vmla.f32 q8, q1, q0",
                "vmla.f32 q9, q2, q0",
                "vmla.f32 q10, q3, q0",
                "vmla.f32 q11, q4, q0",
                "subs {n}, {n}, #1",
                "bne 2b",
                "vld1.32 {{d0[], d1[]}}, [{p}]!",
                "vld1.32 {{d2[], d3[]}}, [{p}]",
                "vmax.f32 q8, q8, q0",
                "vmax.f32 q9, q9, q0",
                "vmax.f32 q10, q10, q0",
                "vmax.f32 q11, q11, q0",
                "vmin.f32 q8, q8, q1",
                "vmin.f32 q9, q9, q1",
                "vmin.f32 q10, q10, q1",
                "vmin.f32 q11, q11, q1",
                "vst1.32 {{d16, d17, d18, d19}}, [{dst}]!",
                "vst1.32 {{d20, d21, d22, d23}}, [{dst}]",
                base = in(reg) base,
                offs = inout(reg) offsets.as_ptr() => _,
                w = inout(reg) w => _,
                n = inout(reg) taps => _,
                p = inout(reg) params.as_ptr() => _,
                dst = inout(reg) dst => _,
                t = out(reg) _,
                out("q0") _, out("q1") _, out("q2") _, out("q3") _, out("q4") _,
                out("q8") _, out("q9") _, out("q10") _, out("q11") _,
                options(nostack),
            );
        }
    }

    /// 4 outputs, as [`block16`].
    ///
    /// # Safety
    /// As [`block16`], for 4 floats.
    #[inline(always)]
    unsafe fn block4(
        base: *const f32,
        offsets: &[usize; MAX_TAPS],
        w: *const f32,
        taps: usize,
        params: &[f32; 3],
        dst: *mut f32,
    ) {
        // SAFETY: as in block16.
        unsafe {
            core::arch::asm!(
                "vld1.32 {{d16[], d17[]}}, [{p}]!",
                "2:",
                "ldr {t}, [{offs}], #4",
                "vld1.32 {{d0[], d1[]}}, [{w}]!",
                "add {t}, {t}, {base}",
                "vld1.32 {{d2, d3}}, [{t}]",
                "vmla.f32 q8, q1, q0",
                "subs {n}, {n}, #1",
                "bne 2b",
                "vld1.32 {{d0[], d1[]}}, [{p}]!",
                "vld1.32 {{d2[], d3[]}}, [{p}]",
                "vmax.f32 q8, q8, q0",
                "vmin.f32 q8, q8, q1",
                "vst1.32 {{d16, d17}}, [{dst}]",
                base = in(reg) base,
                offs = inout(reg) offsets.as_ptr() => _,
                w = inout(reg) w => _,
                n = inout(reg) taps => _,
                p = inout(reg) params.as_ptr() => _,
                dst = in(reg) dst,
                t = out(reg) _,
                out("q0") _, out("q1") _, out("q8") _,
                options(nostack),
            );
        }
    }
}

/// Every output row, two at a time (an input row both read is loaded once for both:
/// a third fewer loads for 3x3 at stride 1), in blocks of four vectors, then single
/// vectors, then a last partial vector through a small buffer; an odd last row alone.
/// `KH == 0` means: sizes from `g` at run time.
///
/// # Safety
/// As `run`; `s` holds the filled scratch.
#[inline(always)]
unsafe fn rows<V: F32s, const KH: usize, const KW: usize, const SH: usize, const SW: usize>(
    g: &Geometry,
    pw: usize,
    s: *const f32,
    w: *const f32,
    bias: f32,
    clamp: Clamp,
    o: *mut f32,
) {
    // SAFETY: the caller guarantees V's instruction set.
    let (vb, lo, hi) = unsafe { (V::splat(bias), V::splat(clamp.lo), V::splat(clamp.hi)) };
    let k = Kernel {
        g,
        pw,
        s,
        w,
        vb,
        lo,
        hi,
    };
    let mut oy = 0;
    // SAFETY (both): oy + 1 < oh (or oy < oh), so the rows start inside `out`.
    while oy + 1 < g.oh {
        unsafe {
            row_blocks::<V, 2, KH, KW, SH, SW>(&k, oy, [o.add(oy * g.ow), o.add((oy + 1) * g.ow)])
        };
        oy += 2;
    }
    if oy < g.oh {
        unsafe { row_blocks::<V, 1, KH, KW, SH, SW>(&k, oy, [o.add(oy * g.ow)]) };
    }
}

/// What every block of one plane shares.
struct Kernel<'a, V> {
    g: &'a Geometry,
    pw: usize,
    s: *const f32,
    w: *const f32,
    vb: V,
    lo: V,
    hi: V,
}

/// Output rows `oy..oy + R` (`dst` their first floats) across the whole width.
///
/// # Safety
/// As `rows`; each `dst[j]` is writable for `ow` floats.
#[inline(always)]
unsafe fn row_blocks<
    V: F32s,
    const R: usize,
    const KH: usize,
    const KW: usize,
    const SH: usize,
    const SW: usize,
>(
    k: &Kernel<V>,
    oy: usize,
    dst: [*mut f32; R],
) {
    let (l, ow) = (V::LANES, k.g.ow);
    let at = |x0: usize| dst.map(|d| d.wrapping_add(x0));
    let mut x0 = 0;
    // SAFETY (all three): the loads stay inside the scratch by `phase_width`'s rounding;
    // the stores write [x0, x0 + n * LANES) < ow of each row, or the stack buffers.
    while x0 + 4 * l <= ow {
        unsafe { block::<V, 4, R, KH, KW, SH, SW>(k, oy, x0, at(x0)) };
        x0 += 4 * l;
    }
    while x0 + l <= ow {
        unsafe { block::<V, 1, R, KH, KW, SH, SW>(k, oy, x0, at(x0)) };
        x0 += l;
    }
    if x0 < ow {
        let mut tail = [[0f32; 16]; R];
        debug_assert!(l <= 16);
        let tails = std::array::from_fn(|j| tail[j].as_mut_ptr());
        unsafe {
            block::<V, 1, R, KH, KW, SH, SW>(k, oy, x0, tails);
            for (t, d) in tail.iter().zip(dst) {
                std::ptr::copy_nonoverlapping(t.as_ptr(), d.add(x0), ow - x0);
            }
        }
    }
}

/// `U` vectors of outputs starting at column `x0` of output rows `oy..oy + R`: each
/// input row the `R` rows read is loaded once and multiplied into every row that uses
/// it, with the accumulators kept in registers across all taps.
///
/// # Safety
/// As `rows`; each `dst[j]` is writable for `U * LANES` floats.
#[inline(always)]
unsafe fn block<
    V: F32s,
    const U: usize,
    const R: usize,
    const KH: usize,
    const KW: usize,
    const SH: usize,
    const SW: usize,
>(
    k: &Kernel<V>,
    oy: usize,
    x0: usize,
    dst: [*mut f32; R],
) {
    let g = k.g;
    let (kh, kw, sh, sw) = if KH == 0 {
        (g.kh, g.kw, g.sh, g.sw)
    } else {
        (KH, KW, SH, SW)
    };
    let mut acc = [[k.vb; U]; R];
    // Input rows oy * sh .. (oy + R - 1) * sh + kh; output row oy + j reads the ones
    // at ky = rr - j * sh in 0..kh.
    for rr in 0..(R - 1) * sh + kh {
        let r = oy * sh + rr;
        for kx in 0..kw {
            // SAFETY: r < rows (the last output row of the block is < oh), kx % sw < sw
            // and the column range of the widest block ends inside the phase
            // (`phase_width`); the weight index < kh * kw.
            unsafe {
                let src = k.s.add((r * sw + kx % sw) * k.pw + kx / sw + x0);
                let v: [V; U] = std::array::from_fn(|u| V::load(src.add(u * V::LANES)));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let ky = rr.wrapping_sub(j * sh);
                    if ky < kh {
                        let wv = V::splat(*k.w.add(ky * kw + kx));
                        for (a, v) in acc.iter_mut().zip(&v) {
                            *a = v.mul_add(wv, *a);
                        }
                    }
                }
            }
        }
    }
    for (acc, d) in acc.iter().zip(dst) {
        for (u, a) in acc.iter().enumerate() {
            // SAFETY: d is writable for U * LANES floats (the caller's contract).
            unsafe { a.clamp(k.lo, k.hi).store(d.add(u * V::LANES)) };
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The definition, one output at a time, with f64 sums.
    fn reference(g: &Geometry, input: &[f32], k: &[f32], bias: f32, c: Clamp) -> Vec<f32> {
        let mut out = vec![0.0; g.oh * g.ow];
        for y in 0..g.oh {
            for x in 0..g.ow {
                let mut acc = bias as f64;
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let iy = (y * g.sh + ky) as isize - g.pad_top as isize;
                        let ix = (x * g.sw + kx) as isize - g.pad_left as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                            acc += k[ky * g.kw + kx] as f64
                                * input[iy as usize * g.w + ix as usize] as f64;
                        }
                    }
                }
                out[y * g.ow + x] = (acc as f32).max(c.lo).min(c.hi);
            }
        }
        out
    }

    /// A small deterministic generator (the tests must not depend on a crate's stream).
    pub(in super::super) struct Lcg(pub(in super::super) u64);
    impl Lcg {
        /// Uniform in [-1, 1).
        pub(in super::super) fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Generic];
        if Isa::detect() != Isa::Generic {
            v.push(Isa::detect());
        }
        v
    }

    /// Output size as ONNX computes it from explicit pads.
    fn geometry(h: usize, w: usize, k: usize, s: usize, pads: [usize; 4]) -> Geometry {
        let [pt, pl, pb, pr] = pads;
        Geometry {
            h,
            w,
            oh: (h + pt + pb - k) / s + 1,
            ow: (w + pl + pr - k) / s + 1,
            kh: k,
            kw: k,
            sh: s,
            sw: s,
            pad_top: pt,
            pad_left: pl,
        }
    }

    #[test]
    fn every_kernel_matches_the_definition_on_every_shape_and_padding_our_models_use() {
        let mut rng = Lcg(7);
        let mut scratch = Vec::new();
        // Sizes around the vector widths (1..=40 columns cross 4, 8, 16 and 32),
        // symmetric pads (SSD) and TF-SAME's asymmetric ones (EfficientNet-Lite), VALID,
        // and a 7x3 kernel for the general path.
        for &(k, s, pads) in &[
            (3, 1, [1, 1, 1, 1]),
            (3, 2, [1, 1, 1, 1]),
            (3, 2, [0, 0, 1, 1]),
            (5, 1, [2, 2, 2, 2]),
            (5, 2, [1, 1, 2, 2]),
            (5, 2, [2, 2, 2, 2]),
            (3, 1, [0, 0, 0, 0]),
            (7, 1, [3, 3, 3, 3]),
            (3, 3, [1, 1, 1, 1]),
        ] {
            for &(h, w) in &[(1, 1), (5, 3), (7, 9), (12, 17), (9, 33), (36, 48), (4, 40)] {
                if h + pads[0] + pads[2] < k || w + pads[1] + pads[3] < k {
                    continue;
                }
                let g = geometry(h, w, k, s, pads);
                let input: Vec<f32> = (0..h * w).map(|_| rng.next() * 4.0).collect();
                let weights: Vec<f32> = (0..k * k).map(|_| rng.next()).collect();
                let bias = rng.next();
                for clamp in [
                    Clamp::NONE,
                    Clamp { lo: 0.0, hi: 6.0 },
                    Clamp {
                        lo: 0.0,
                        hi: f32::INFINITY,
                    },
                ] {
                    let want = reference(&g, &input, &weights, bias, clamp);
                    for isa in isas() {
                        // Garbage in the output and scratch: everything must be written.
                        let mut out = vec![f32::NAN; g.oh * g.ow + 3];
                        scratch.iter_mut().for_each(|v| *v = f32::NAN);
                        plane(
                            isa,
                            &g,
                            &input,
                            &weights,
                            bias,
                            clamp,
                            &mut out,
                            &mut scratch,
                        );
                        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "{isa:?} {g:?} {clamp:?}: out[{i}] = {a}, want {b}"
                            );
                        }
                        assert!(
                            out[g.oh * g.ow..].iter().all(|v| v.is_nan()),
                            "{isa:?} wrote past the plane"
                        );
                        // Channels last: the plane in each of 37 channels (vector blocks
                        // of every width and a scalar tail, on every instruction set),
                        // the output rows in two calls.
                        let c = 37;
                        let spread =
                            |v: &[f32]| v.iter().flat_map(|x| [*x; 37]).collect::<Vec<f32>>();
                        let (hin, hw, hb) = (spread(&input), spread(&weights), vec![bias; c]);
                        let mut hout = vec![f32::NAN; g.oh * g.ow * c];
                        let mid = g.oh / 2;
                        let (top, bottom) = hout.split_at_mut(mid * g.ow * c);
                        hwc(isa, &g, c, &hin, &hw, &hb, clamp, top, 0..mid);
                        hwc(isa, &g, c, &hin, &hw, &hb, clamp, bottom, mid..g.oh);
                        for (i, a) in hout.iter().enumerate() {
                            let b = want[i / c];
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "hwc {isa:?} {g:?} {clamp:?}: out[{i}] = {a}, want {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
