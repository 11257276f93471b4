//! int8 pointwise (1x1) convolutions on the CPU's 8-bit dot-product instructions, with
//! their requantisation fused.
//!
//! Pointwise convolutions are 55 of the int8 SSD's 72 layers and most of its time. tract
//! runs them as int8 matrix products whose kernels widen every byte to 16 bits and
//! multiply-accumulate four 32-bit lanes per instruction: no more work per instruction
//! than its f32 kernels, so the int8 model barely beat fp32 (docs/performance.md). CPUs
//! made since 2019 have an instruction that does sixteen 8-bit multiplies and their sums
//! per 128 bits: `SDOT` on Armv8.2 (Cortex-A76 in the Raspberry Pi 5, A78AE in the
//! Jetson Orin, A55) and `VPDPBUSD` on x86_64 (AVX-512 VNNI: Ice Lake, Zen 4).
//! [`QuantPointwiseConv`] runs the layer on those. On a CPU without them (Cortex-A72 in
//! the Raspberry Pi 4, 32-bit ARM, older x86) [`install`](super::install) leaves the
//! layer to tract.
//!
//! Both operands are packed "k-major": for each group of four input channels, four bytes
//! per row (a pixel, or an output channel), rows consecutive. Four bytes are one 32-bit
//! lane of the dot-product instructions, so one load gives the same four channels of
//! four (or eight) consecutive rows, and the kernel walks the channels with a fixed
//! stride. The weights are packed once, when the op is made; the input once per
//! evaluation, before the rows are shared out over tract's thread pool.
//!
//! The integer arithmetic is exact: `bias + sum((x - x0) * (w - w0))` in i32, checked
//! at install to stay within i32 for every input. The dot-product instructions multiply
//! a fixed signedness (VNNI: unsigned by signed; SDOT: signed by signed), so the input
//! is flipped into that domain by its top bit (`x ^ 0x80` is `x - 128` read as i8) and
//! the zero point moves with it: `sum((d - d0) * w')` is the same sum. The weights
//! minus their zero point must fit in i8 (they do for symmetric weights, onnxruntime's
//! default, and for u8 weights around 128); other layers are left to tract.
//!
//! The requantisation is [`requantise`]: `(acc as f32) * (x_scale * w_scale / y_scale)`,
//! rounded half to even, plus the output zero point, saturated: onnxruntime's
//! `QLinearConv` arithmetic, and the depthwise kernel's ([`super::quant`]).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::quant::{konst_f32, Byte};

/// Beyond this magnitude the product is clamped before rounding; anything this large
/// saturates the 8-bit output anyway (the same clamp as the depthwise kernel's).
const ROUND_RANGE: f32 = 4_194_304.0;

/// Rows (pixels or output channels) the packed operands are padded by, so that a tile
/// starting at any row reads inside the buffer: the widest tile of any instruction set.
const ROW_PAD: usize = 16;

thread_local! {
    /// The packed input of the last layer this thread ran (see `run`): at most the
    /// largest layer's input, 2.2 MB for the SSD's 96 x 150 x 150.
    static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An instruction set with an 8-bit dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DotIsa {
    /// Plain Rust: the reference the others are tested against, and what the op's tests
    /// run on every CPU. Never installed (tract's int8 kernels are faster than it).
    Generic,
    /// AVX-512 VNNI on 256-bit vectors (`avx512vnni` and `avx512vl`): Ice Lake, Zen 4.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// Armv8.2's dot product (`dotprod`): Cortex-A76 (Raspberry Pi 5), A78AE (Jetson
    /// Orin), A55.
    #[cfg(target_arch = "aarch64")]
    Dotprod,
}

impl DotIsa {
    /// The dot-product instruction set this CPU offers, if any.
    pub fn detect() -> Option<DotIsa> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return Some(DotIsa::Vnni);
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Some(DotIsa::Dotprod);
        }
        None
    }

    /// Short name, part of the kernel names.
    pub fn name(self) -> &'static str {
        match self {
            DotIsa::Generic => "generic",
            #[cfg(target_arch = "x86_64")]
            DotIsa::Vnni => "vnni",
            #[cfg(target_arch = "aarch64")]
            DotIsa::Dotprod => "dotprod",
        }
    }

    /// The tile: rows of the vector operand (the lanes of the result) and rows of the
    /// broadcast operand.
    fn tile(self) -> (usize, usize) {
        match self {
            DotIsa::Generic => (8, 4),
            #[cfg(target_arch = "x86_64")]
            DotIsa::Vnni => (16, 8),
            #[cfg(target_arch = "aarch64")]
            DotIsa::Dotprod => (8, 8),
        }
    }

    /// Whether the input enters the dot product as signed bytes (else unsigned).
    fn signed_input(self) -> bool {
        match self {
            DotIsa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            DotIsa::Vnni => false,
            #[cfg(target_arch = "aarch64")]
            DotIsa::Dotprod => true,
        }
    }
}

/// `shelfwatch_pw_q8_<isa>`, e.g. `shelfwatch_pw_q8_dotprod` on a Raspberry Pi 5.
pub fn kernel_name(isa: DotIsa) -> String {
    format!("shelfwatch_pw_q8_{}", isa.name())
}

/// The requantisation of one exact accumulator, as every kernel computes it.
#[inline(always)]
fn requantise(acc: i32, scale: f32, zero: i32, lo: i32, hi: i32) -> i32 {
    let v = ((acc as f32) * scale).clamp(-ROUND_RANGE, ROUND_RANGE);
    (v.round_ties_even() as i32 + zero).clamp(lo, hi)
}

/// A quantised 1x1 convolution, stride 1, one group: 8-bit NCHW (or CHW) or NHWC (HWC)
/// in, 8-bit out, the same layout.
#[derive(Debug, Clone)]
pub struct QuantPointwiseConv {
    channels_last: bool,
    /// Pixels per image (height x width).
    pixels: usize,
    inputs: usize,
    outputs: usize,
    input: Byte,
    output: Byte,
    /// The weights minus their zero point, k-major: `[inputs / 4][outputs + pad][4]`.
    packed: Arc<[i8]>,
    /// Rows of `packed` per group of four input channels.
    packed_rows: usize,
    /// Per output channel: the bias minus the input's zero point (in the kernel's
    /// domain) times the sum of the channel's weights.
    bias: Arc<[i32]>,
    /// Per output channel: `w_scale * x_scale / y_scale`.
    scale: Arc<[f32]>,
    y_zero: i32,
    isa: DotIsa,
    output_shape: TVec<usize>,
}

impl PartialEq for QuantPointwiseConv {
    fn eq(&self, other: &Self) -> bool {
        self.channels_last == other.channels_last
            && self.pixels == other.pixels
            && self.inputs == other.inputs
            && self.outputs == other.outputs
            && self.input == other.input
            && self.output == other.output
            && self.packed == other.packed
            && self.bias == other.bias
            && super::bits(&self.scale) == super::bits(&other.scale)
            && self.y_zero == other.y_zero
            && self.isa == other.isa
            && self.output_shape == other.output_shape
    }
}
impl Eq for QuantPointwiseConv {}

/// What every tile of a layer shares.
#[derive(Clone, Copy)]
struct Shared {
    /// Groups of four input channels.
    groups: usize,
    /// Bias and scale are one per lane (channels last: lanes are output channels), not
    /// one per broadcast row (channels first).
    per_lane: bool,
    /// The output's zero point and range.
    zero: i32,
    lo: i32,
    hi: i32,
}

/// Where one tile's operands and results are.
#[derive(Clone, Copy)]
struct Tile {
    /// The vector operand at its first row, group 0, and its stride per group (bytes).
    vec: *const u8,
    vec_stride: usize,
    /// The broadcast operand, likewise.
    bcast: *const u8,
    bcast_stride: usize,
    /// Output row `i` (one per broadcast row) starts at `out + i * out_stride`; lanes
    /// are consecutive bytes.
    out: *mut u8,
    out_stride: usize,
    /// Valid broadcast rows and lanes (a tile at the edge computes padding it does not
    /// store).
    rows: usize,
    lanes: usize,
    /// Bias and scale at the tile's first output channel (see [`Shared::per_lane`]).
    bias: *const i32,
    scale: *const f32,
    layer: Shared,
}

impl QuantPointwiseConv {
    pub fn kernel_name(&self) -> String {
        kernel_name(self.isa)
    }

    fn groups(&self) -> usize {
        self.inputs.div_ceil(4)
    }

    /// Packs one image `[pixels][inputs]` or `[inputs][pixels]` k-major, flipping each
    /// byte's top bit where the input's signedness is not the kernel's.
    fn pack_input(&self, x: &[u8], packed: &mut [u8], rows: usize) {
        let flip = if (self.input == Byte::I8) == self.isa.signed_input() {
            0
        } else {
            0x8080_8080u32
        };
        let (c, n) = (self.inputs, self.pixels);
        // Four bytes at a time. The bytes past the last channel of the last group are
        // left as they are: their weights are zero.
        let word = |b: &[u8]| {
            let mut w = [0u8; 4];
            w[..b.len()].copy_from_slice(b);
            u32::from_ne_bytes(w) ^ flip
        };
        for g in 0..self.groups() {
            let dst = &mut packed[g * rows * 4..(g * rows + n) * 4];
            let (first, full) = (4 * g, (4 * g + 4).min(c) - 4 * g);
            if self.channels_last {
                for (p, d) in dst.chunks_exact_mut(4).enumerate() {
                    let at = p * c + first;
                    d.copy_from_slice(&word(&x[at..at + full]).to_ne_bytes());
                }
            } else if full == 4 {
                let plane = |j: usize| &x[(first + j) * n..(first + j + 1) * n];
                let (a, b, cc, d) = (plane(0), plane(1), plane(2), plane(3));
                for (p, out) in dst.chunks_exact_mut(4).enumerate() {
                    let w = u32::from_ne_bytes([a[p], b[p], cc[p], d[p]]) ^ flip;
                    out.copy_from_slice(&w.to_ne_bytes());
                }
            } else {
                for (p, out) in dst.chunks_exact_mut(4).enumerate() {
                    let mut b = [0u8; 4];
                    for (j, b) in b.iter_mut().enumerate().take(full) {
                        *b = x[(first + j) * n + p];
                    }
                    out.copy_from_slice(&word(&b[..full]).to_ne_bytes());
                }
            }
        }
    }

    fn run(&self, x: &[u8]) -> TractResult<Tensor> {
        let (n, c, m) = (self.pixels, self.inputs, self.outputs);
        ensure!(
            x.len() == n * c,
            "quantised pointwise input has {} values, expected {}",
            x.len(),
            n * c
        );
        let (vec_rows, bcast_rows) = self.isa.tile();
        let (lo, hi) = match self.output {
            Byte::U8 => (0, 255),
            Byte::I8 => (-128, 127),
        };
        // SAFETY: every value of the output is written below: each tile stores its valid
        // rows and lanes, and the tiles cover every pixel of every output channel.
        let mut output =
            unsafe { Tensor::uninitialized_dt(self.output.datum(), &self.output_shape)? };
        let mut view = output.try_as_plain_ram_mut()?;
        // u8 or i8: the kernels write bytes.
        let out = view.as_bytes_mut();
        let rows = n + ROW_PAD;
        // The packed input, kept per thread between layers and frames: a fresh zeroed
        // buffer per layer cost more than the packing. Whatever a previous layer left in
        // it where this one writes nothing (past the last channel, past the last pixel)
        // meets zero weights or is never stored.
        let mut packed = PACKED.with_borrow_mut(std::mem::take);
        let len = self.groups() * rows * 4;
        if packed.len() < len {
            packed.resize(len, 0);
        }
        let total = n * m;
        self.pack_input(x, &mut packed, rows);
        let layer = Shared {
            groups: self.groups(),
            per_lane: self.channels_last,
            zero: self.y_zero,
            lo,
            hi,
        };
        let (weights, input) = (&*self.packed, &*packed);
        if self.channels_last {
            // Rows of the output are pixels: the vector operand is the weights
            // (lanes are output channels), the broadcast one the pixels.
            tract_linalg::multithread::par_chunks_mut(out, m, total, |first, chunk| {
                let count = chunk.len() / m;
                for o in (0..m).step_by(vec_rows) {
                    for p in (0..count).step_by(bcast_rows) {
                        let t = Tile {
                            vec: weights.as_ptr().wrapping_add(o * 4) as *const u8,
                            vec_stride: self.packed_rows * 4,
                            bcast: input.as_ptr().wrapping_add((first + p) * 4),
                            bcast_stride: rows * 4,
                            out: chunk[p * m + o..].as_mut_ptr(),
                            out_stride: m,
                            rows: (count - p).min(bcast_rows),
                            lanes: (m - o).min(vec_rows),
                            bias: self.bias[o..].as_ptr(),
                            scale: self.scale[o..].as_ptr(),
                            layer,
                        };
                        // SAFETY: the operands hold `groups` groups of every row up
                        // to the tile's plus ROW_PAD; the output rows and lanes
                        // written are inside `chunk`.
                        unsafe { self.tile(t) };
                    }
                }
                Ok(())
            })?;
        } else {
            // Rows of the output are output channels: the vector operand is the
            // pixels, the broadcast one the weights.
            tract_linalg::multithread::par_chunks_mut(out, n, total, |first, chunk| {
                let count = chunk.len() / n;
                for p in (0..n).step_by(vec_rows) {
                    for o in (0..count).step_by(bcast_rows) {
                        let t = Tile {
                            vec: input.as_ptr().wrapping_add(p * 4),
                            vec_stride: rows * 4,
                            bcast: weights.as_ptr().wrapping_add((first + o) * 4) as *const u8,
                            bcast_stride: self.packed_rows * 4,
                            out: chunk[o * n + p..].as_mut_ptr(),
                            out_stride: n,
                            rows: (count - o).min(bcast_rows),
                            lanes: (n - p).min(vec_rows),
                            bias: self.bias[first + o..].as_ptr(),
                            scale: self.scale[first + o..].as_ptr(),
                            layer,
                        };
                        // SAFETY: as above.
                        unsafe { self.tile(t) };
                    }
                }
                Ok(())
            })?;
        }
        PACKED.with_borrow_mut(|p| *p = packed);
        Ok(output)
    }

    /// # Safety
    /// The tile's pointers are valid as [`Tile`] describes, for the tile sizes of
    /// `self.isa`, and the CPU has `self.isa`.
    unsafe fn tile(&self, t: Tile) {
        match self.isa {
            // SAFETY: passed on from the caller.
            DotIsa::Generic => unsafe { generic::tile(t) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: passed on from the caller; DotIsa::Vnni is only made where the CPU
            // has it (tests make it only after detecting it).
            DotIsa::Vnni => unsafe { vnni::tile(t) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as for Vnni.
            DotIsa::Dotprod => unsafe { dotprod::tile(t) },
        }
    }
}

/// Stores one row of requantised lanes (`vals`, `lanes` of them valid).
///
/// # Safety
/// `out` is valid for writing `lanes` bytes.
#[inline(always)]
unsafe fn store_row<const N: usize>(vals: &[u8; N], out: *mut u8, lanes: usize) {
    if lanes >= N {
        // A whole row: one store of a known size, not a call to memcpy.
        // SAFETY: passed on from the caller.
        unsafe { (out as *mut [u8; N]).write_unaligned(*vals) }
    } else {
        // SAFETY: passed on from the caller.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), out, lanes) }
    }
}

mod generic {
    use super::{requantise, store_row, Tile};

    /// # Safety
    /// As [`super::QuantPointwiseConv::tile`], with 8 lanes and 4 broadcast rows.
    pub(super) unsafe fn tile(t: Tile) {
        const L: usize = 8;
        const R: usize = 4;
        let mut acc = [[0i32; L]; R];
        for g in 0..t.layer.groups {
            // SAFETY: inside the operands (caller).
            let v = unsafe { std::slice::from_raw_parts(t.vec.add(g * t.vec_stride), L * 4) };
            let b = unsafe { std::slice::from_raw_parts(t.bcast.add(g * t.bcast_stride), R * 4) };
            for (i, acc) in acc.iter_mut().enumerate() {
                for (j, a) in acc.iter_mut().enumerate() {
                    for k in 0..4 {
                        // Signed by signed, like SDOT.
                        *a += i32::from(v[j * 4 + k] as i8) * i32::from(b[i * 4 + k] as i8);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(t.rows) {
            let mut row = [0u8; L];
            for (j, (r, &a)) in row.iter_mut().zip(acc).enumerate() {
                let at = if t.layer.per_lane { j } else { i };
                // SAFETY: bias and scale hold the tile's output channels (caller).
                let (bias, scale) = unsafe { (*t.bias.add(at), *t.scale.add(at)) };
                *r = requantise(a + bias, scale, t.layer.zero, t.layer.lo, t.layer.hi) as u8;
            }
            // SAFETY: row i of the output (caller).
            unsafe { store_row(&row, t.out.add(i * t.out_stride), t.lanes) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{store_row, Tile, ROUND_RANGE};

    const L: usize = 16;
    const R: usize = 8;

    /// # Safety
    /// As [`super::QuantPointwiseConv::tile`], with 16 lanes and 8 broadcast rows, on a
    /// CPU with AVX-512 VNNI and VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(t: Tile) {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        // The unsigned operand is the input: the broadcast one when lanes are output
        // channels (channels last), the vector one otherwise.
        let input_is_bcast = t.layer.per_lane;
        for g in 0..t.layer.groups {
            // SAFETY: inside the operands (caller).
            let (v0, v1, b) = unsafe {
                let v = t.vec.add(g * t.vec_stride);
                (
                    _mm256_loadu_si256(v as *const __m256i),
                    _mm256_loadu_si256(v.add(32) as *const __m256i),
                    t.bcast.add(g * t.bcast_stride),
                )
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: inside the broadcast operand (caller).
                let s = _mm256_set1_epi32(unsafe { (b.add(i * 4) as *const i32).read_unaligned() });
                if input_is_bcast {
                    acc[0] = _mm256_dpbusd_epi32(acc[0], s, v0);
                    acc[1] = _mm256_dpbusd_epi32(acc[1], s, v1);
                } else {
                    acc[0] = _mm256_dpbusd_epi32(acc[0], v0, s);
                    acc[1] = _mm256_dpbusd_epi32(acc[1], v1, s);
                }
            }
        }
        let (zero, lo, hi) = (
            _mm256_set1_epi32(t.layer.zero),
            _mm256_set1_epi32(t.layer.lo),
            _mm256_set1_epi32(t.layer.hi),
        );
        let (rlo, rhi) = (_mm256_set1_ps(-ROUND_RANGE), _mm256_set1_ps(ROUND_RANGE));
        for (i, acc) in acc.iter().enumerate().take(t.rows) {
            let mut row = [0u8; L];
            for (h, &a) in acc.iter().enumerate() {
                // SAFETY: bias and scale hold the tile's output channels (caller).
                let (bias, scale) = unsafe {
                    if t.layer.per_lane {
                        (
                            _mm256_loadu_si256(t.bias.add(h * 8) as *const __m256i),
                            _mm256_loadu_ps(t.scale.add(h * 8)),
                        )
                    } else {
                        (
                            _mm256_set1_epi32(*t.bias.add(i)),
                            _mm256_set1_ps(*t.scale.add(i)),
                        )
                    }
                };
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, bias)), scale);
                let v = _mm256_min_ps(_mm256_max_ps(v, rlo), rhi);
                // Rounds half to even: the default MXCSR mode, which Rust never changes.
                let r = _mm256_add_epi32(_mm256_cvtps_epi32(v), zero);
                let r = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
                // SAFETY: 8 bytes into the 16-byte row.
                unsafe {
                    _mm_storel_epi64(
                        row.as_mut_ptr().add(h * 8) as *mut __m128i,
                        _mm256_cvtepi32_epi8(r),
                    )
                };
            }
            // SAFETY: row i of the output (caller).
            unsafe { store_row(&row, t.out.add(i * t.out_stride), t.lanes) };
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod dotprod {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::{store_row, Tile};

    const L: usize = 8;
    const R: usize = 8;

    /// # Safety
    /// As [`super::QuantPointwiseConv::tile`], with 8 lanes and 8 broadcast rows, on a
    /// CPU with the dot product.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn tile(t: Tile) {
        let z = vdupq_n_s32(0);
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) =
            (z, z, z, z, z, z, z, z);
        let (mut c0, mut c1, mut c2, mut c3, mut c4, mut c5, mut c6, mut c7) =
            (z, z, z, z, z, z, z, z);
        for g in 0..t.layer.groups {
            // SAFETY: inside the operands (caller).
            let (v0, v1, b0, b1) = unsafe {
                let v = t.vec.add(g * t.vec_stride) as *const i8;
                let b = t.bcast.add(g * t.bcast_stride) as *const i8;
                (
                    vld1q_s8(v),
                    vld1q_s8(v.add(16)),
                    vld1q_s8(b),
                    vld1q_s8(b.add(16)),
                )
            };
            // SDOT by element: lanes `aN` (lanes 0-3) and `cN` (lanes 4-7) of broadcast
            // row N take the dot products of their four bytes of `v0`/`v1` with row N's
            // four bytes, which are lane N % 4 of `b0` (rows 0-3) or `b1` (rows 4-7).
            // Rust's intrinsic for it is not stable yet.
            // SAFETY: register-only arithmetic; the CPU has the dot product (caller).
            unsafe {
                asm!(
                    "sdot {a0:v}.4s, {v0:v}.16b, {b0:v}.4b[0]",
                    "sdot {c0:v}.4s, {v1:v}.16b, {b0:v}.4b[0]",
                    "sdot {a1:v}.4s, {v0:v}.16b, {b0:v}.4b[1]",
                    "sdot {c1:v}.4s, {v1:v}.16b, {b0:v}.4b[1]",
                    "sdot {a2:v}.4s, {v0:v}.16b, {b0:v}.4b[2]",
                    "sdot {c2:v}.4s, {v1:v}.16b, {b0:v}.4b[2]",
                    "sdot {a3:v}.4s, {v0:v}.16b, {b0:v}.4b[3]",
                    "sdot {c3:v}.4s, {v1:v}.16b, {b0:v}.4b[3]",
                    "sdot {a4:v}.4s, {v0:v}.16b, {b1:v}.4b[0]",
                    "sdot {c4:v}.4s, {v1:v}.16b, {b1:v}.4b[0]",
                    "sdot {a5:v}.4s, {v0:v}.16b, {b1:v}.4b[1]",
                    "sdot {c5:v}.4s, {v1:v}.16b, {b1:v}.4b[1]",
                    "sdot {a6:v}.4s, {v0:v}.16b, {b1:v}.4b[2]",
                    "sdot {c6:v}.4s, {v1:v}.16b, {b1:v}.4b[2]",
                    "sdot {a7:v}.4s, {v0:v}.16b, {b1:v}.4b[3]",
                    "sdot {c7:v}.4s, {v1:v}.16b, {b1:v}.4b[3]",
                    a0 = inout(vreg) a0, a1 = inout(vreg) a1, a2 = inout(vreg) a2,
                    a3 = inout(vreg) a3, a4 = inout(vreg) a4, a5 = inout(vreg) a5,
                    a6 = inout(vreg) a6, a7 = inout(vreg) a7,
                    c0 = inout(vreg) c0, c1 = inout(vreg) c1, c2 = inout(vreg) c2,
                    c3 = inout(vreg) c3, c4 = inout(vreg) c4, c5 = inout(vreg) c5,
                    c6 = inout(vreg) c6, c7 = inout(vreg) c7,
                    v0 = in(vreg) v0, v1 = in(vreg) v1, b0 = in(vreg) b0, b1 = in(vreg) b1,
                    options(pure, nomem, nostack),
                );
            }
        }
        let acc: [[int32x4_t; 2]; R] = [
            [a0, c0],
            [a1, c1],
            [a2, c2],
            [a3, c3],
            [a4, c4],
            [a5, c5],
            [a6, c6],
            [a7, c7],
        ];
        // The clamps of `requantise` as saturations, where NEON has them for free:
        // FCVTNS saturates to i32, SQADD adds the zero point without wrapping, and the
        // saturating narrowings to i16 then to u8 (or i8) clamp to the output's range
        // (`lo..=hi` is always the whole of u8 or i8). Past 2^22 the reference clamps
        // first; either way such a value saturates the output the same way.
        let zero = vdupq_n_s32(t.layer.zero);
        let unsigned = t.layer.lo == 0;
        for (i, acc) in acc.iter().enumerate().take(t.rows) {
            let mut r = [z; 2];
            for (h, &a) in acc.iter().enumerate() {
                // SAFETY: bias and scale hold the tile's output channels (caller).
                let (bias, scale) = unsafe {
                    if t.layer.per_lane {
                        (vld1q_s32(t.bias.add(h * 4)), vld1q_f32(t.scale.add(h * 4)))
                    } else {
                        (vdupq_n_s32(*t.bias.add(i)), vdupq_n_f32(*t.scale.add(i)))
                    }
                };
                let v = vmulq_f32(vcvtq_f32_s32(vaddq_s32(a, bias)), scale);
                // FCVTNS: to nearest, ties to even.
                r[h] = vqaddq_s32(vcvtnq_s32_f32(v), zero);
            }
            let halves = vcombine_s16(vqmovn_s32(r[0]), vqmovn_s32(r[1]));
            let bytes = if unsigned {
                vqmovun_s16(halves)
            } else {
                vreinterpret_u8_s8(vqmovn_s16(halves))
            };
            let mut row = [0u8; L];
            // SAFETY: 8 bytes into the 8-byte row.
            unsafe { vst1_u8(row.as_mut_ptr(), bytes) };
            // SAFETY: row i of the output (caller).
            unsafe { store_row(&row, t.out.add(i * t.out_stride), t.lanes) };
        }
    }
}

impl Op for QuantPointwiseConv {
    fn name(&self) -> StaticName {
        "ShelfwatchQuantPointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "1x1 {} -> {} on {} pixels{}, {:?} -> {:?}, {}",
            self.inputs,
            self.outputs,
            self.pixels,
            if self.channels_last {
                " (channels last)"
            } else {
                ""
            },
            self.input,
            self.output,
            self.kernel_name()
        )])
    }

    fn validation(&self) -> Validation {
        // Requantised with the exact scale, tract with a fixed-point one.
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QuantPointwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.try_as_plain_ram()?;
        let bytes = view.as_bytes();
        Ok(tvec!(self.run(bytes)?.into_tvalue()))
    }
}

impl TypedOp for QuantPointwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && Byte::of(inputs[0].datum_type) == Some(self.input));
        Ok(tvec!(self.output.datum().fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let macs = self.pixels * self.inputs * self.outputs;
        Ok(tvec!((Cost::FMA(i32::datum_type()), macs.to_dim())))
    }

    as_op!();
}

/// One constant input as i32 values (bias, zero points), or None.
fn konst_i32(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Vec<i32>>> {
    let Some(k) = model.outlet_fact(outlet)?.konst.clone() else {
        return Ok(None);
    };
    if !k.datum_type().is_integer() {
        return Ok(None);
    }
    let k = k.cast_to::<i32>()?;
    let view = k.try_as_plain_ram()?;
    Ok(Some(view.as_slice::<i32>()?.to_vec()))
}

/// The shape of a quantised 1x1 convolution as tract declutters it: an `EinSum` of the
/// data `[c][pixels]` (or `[pixels][c]`) with the weights `[m][c]` (or `[c][m]`) into
/// `[m][pixels]` (or `[pixels][m]`).
struct Shape {
    channels_last: bool,
    pixels: usize,
    c: usize,
    m: usize,
    /// Whether the weights are stored `[c][m]`.
    weights_transposed: bool,
}

/// Reads the 1x1 convolution out of an `EinSum`'s axes, if that is what it is: one axis
/// summed between the data and the weights (the input channels), one axis of the
/// weights kept (the output channels), every other axis of the data kept in the output
/// in the same order (the pixels) or of size 1, and the channel axes at the same end of
/// the data and of the output, so that both are a matrix of rows of channels or of
/// rows of pixels in memory.
fn shape_of(op: &EinSum, x: &[usize], out: &[usize]) -> Option<Shape> {
    let (mut k, mut o) = (None, None);
    let mut pixels: Vec<(usize, usize)> = Vec::new(); // (position in x, in output)
    for axis in op.axes.iter_all_axes() {
        let (xs, ws, os) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
        if axis.inputs[2..]
            .iter()
            .any(|p| !p.is_empty() && axis.inputs[1].is_empty())
        {
            return None; // a bias or scale along a pixel axis
        }
        match (xs.as_slice(), ws.as_slice(), os.as_slice()) {
            (&[xp], &[wp], &[]) if k.is_none() => k = Some((xp, wp)),
            (&[], &[wp], &[op]) if o.is_none() => o = Some((wp, op)),
            (&[xp], &[], &[op]) => pixels.push((xp, op)),
            // Summed away or added, but of size 1: no values.
            (&[xp], &[], &[]) if x[xp] == 1 => {}
            (&[], &[], &[op]) if out[op] == 1 => {}
            _ => return None,
        }
    }
    let ((kx, kw), (ow, oo)) = (k?, o?);
    let c = x[kx];
    let m = out[oo];
    let before = |dims: &[usize], at: usize| dims[..at].iter().product::<usize>();
    let after = |dims: &[usize], at: usize| dims[at + 1..].iter().product::<usize>();
    let channels_last = match (before(x, kx), after(x, kx), before(out, oo), after(out, oo)) {
        (1, _, 1, _) => false,
        (_, 1, _, 1) => true,
        _ => return None,
    };
    // The pixels, in memory order in both.
    let mut real: Vec<(usize, usize)> = pixels.into_iter().filter(|&(xp, _)| x[xp] > 1).collect();
    real.sort_by_key(|&(xp, _)| xp);
    if real.windows(2).any(|w| w[0].1 > w[1].1) {
        return None;
    }
    let n: usize = real.iter().map(|&(xp, _)| x[xp]).product();
    if n * c != x.iter().product::<usize>() || n * m != out.iter().product::<usize>() {
        return None;
    }
    Some(Shape {
        channels_last,
        pixels: n,
        c,
        m,
        weights_transposed: ow == 1 && kw == 0,
    })
}

/// The [`QuantPointwiseConv`] for a quantised tract `EinSum` node (how tract declutters
/// a 1x1 convolution of stride 1), if it is one we run exactly: 8-bit data, constant
/// weights, bias, zero points and scales (per-tensor for the data), weights that fit in
/// i8 once their zero point is taken off, and an accumulator that stays in i32.
pub(super) fn quant_pointwise_of(
    model: &TypedModel,
    node: &TypedNode,
    op: &EinSum,
    isa: DotIsa,
) -> TractResult<Option<QuantPointwiseConv>> {
    let Some(out_dt) = op.q_params else {
        return Ok(None);
    };
    if node.inputs.len() != 9 || op.axes.input_count() != 9 || op.axes.output_count() != 1 {
        return Ok(None);
    }
    let input_fact = model.outlet_fact(node.inputs[0])?;
    let (Some(input), Some(output)) = (Byte::of(input_fact.datum_type), Byte::of(out_dt)) else {
        return Ok(None);
    };
    let output_fact = model.outlet_fact(OutletId::new(node.id, 0))?;
    let (Some(x_shape), Some(output_shape)) = (
        input_fact.shape.as_concrete(),
        output_fact.shape.as_concrete(),
    ) else {
        return Ok(None);
    };
    let Some(shape) = shape_of(op, x_shape, output_shape) else {
        return Ok(None);
    };
    let Some(weights) = weights_of(model, node.inputs[1], &shape)? else {
        return Ok(None);
    };
    let (c, m) = (shape.c, shape.m);
    let per = |v: &[i32]| v.len() == 1 || v.len() == m;
    let (Some(bias), Some(x0), Some(k0), Some(y0)) = (
        konst_i32(model, node.inputs[2])?,
        konst_i32(model, node.inputs[3])?,
        konst_i32(model, node.inputs[5])?,
        konst_i32(model, node.inputs[7])?,
    ) else {
        return Ok(None);
    };
    let (Some(x_scale), Some(k_scale), Some(y_scale)) = (
        konst_f32(model, node.inputs[4])?,
        konst_f32(model, node.inputs[6])?,
        konst_f32(model, node.inputs[8])?,
    ) else {
        return Ok(None);
    };
    if !per(&bias)
        || !per(&k0)
        || !(k_scale.len() == 1 || k_scale.len() == m)
        || [x0.len(), y0.len(), x_scale.len(), y_scale.len()] != [1, 1, 1, 1]
    {
        return Ok(None);
    }
    // The input's zero point in the kernel's domain (its top bit flipped with the data).
    let x_zero = x0[0]
        + match (input, isa.signed_input()) {
            (Byte::U8, true) => -128,
            (Byte::I8, false) => 128,
            _ => 0,
        };
    let Some((packed, bias, scale)) = pack_weights(
        &weights,
        c,
        &k0,
        &bias,
        isa,
        x_zero,
        &k_scale,
        (x_scale[0], y_scale[0]),
    ) else {
        return Ok(None);
    };
    Ok(Some(QuantPointwiseConv {
        channels_last: shape.channels_last,
        pixels: shape.pixels,
        inputs: c,
        outputs: m,
        input,
        output,
        packed: packed.into(),
        packed_rows: m + ROW_PAD,
        bias: bias.into(),
        scale: scale.into(),
        y_zero: y0[0],
        isa,
        output_shape: output_shape.into(),
    }))
}

/// The constant weights as `[m][c]` integers, or None.
fn weights_of(
    model: &TypedModel,
    outlet: OutletId,
    shape: &Shape,
) -> TractResult<Option<Vec<i32>>> {
    let (c, m) = (shape.c, shape.m);
    let Some(kernel) = model.outlet_fact(outlet)?.konst.clone() else {
        return Ok(None);
    };
    if kernel.rank() != 2 || kernel.len() != m * c || Byte::of(kernel.datum_type()).is_none() {
        return Ok(None);
    }
    let kernel = kernel.cast_to::<i32>()?;
    let kernel = kernel.try_as_plain_ram()?;
    let kernel = kernel.as_slice::<i32>()?;
    Ok(Some(
        (0..m * c)
            .map(|j| {
                if shape.weights_transposed {
                    kernel[(j % c) * m + j / c]
                } else {
                    kernel[j]
                }
            })
            .collect(),
    ))
}

/// The weights `[m][c]` minus their zero point, packed k-major; per output channel the
/// bias with the input's zero point (`x_zero`, in the kernel's domain) folded in, and
/// the scale `k_scale * x_scale / y_scale`. None when a weight leaves i8
/// or a sum could leave i32.
#[allow(clippy::too_many_arguments)]
fn pack_weights(
    weights: &[i32],
    c: usize,
    k0: &[i32],
    bias: &[i32],
    isa: DotIsa,
    x_zero: i32,
    k_scale: &[f32],
    (x_scale, y_scale): (f32, f32),
) -> Option<(Vec<i8>, Vec<i32>, Vec<f32>)> {
    let m = weights.len() / c;
    let at = |v: &[i32], o: usize| if v.len() == 1 { v[0] } else { v[o] };
    let widest = if isa.signed_input() { 128i64 } else { 255 };
    let rows = m + ROW_PAD;
    let mut packed = vec![0i8; c.div_ceil(4) * rows * 4];
    let mut bias_c = Vec::with_capacity(rows);
    let mut scale = Vec::with_capacity(rows);
    for o in 0..m {
        let (mut sum, mut magnitude) = (0i64, 0i64);
        for i in 0..c {
            let wv = i8::try_from(weights[o * c + i] - at(k0, o)).ok()?;
            packed[((i / 4) * rows + o) * 4 + i % 4] = wv;
            sum += i64::from(wv);
            magnitude += i64::from(wv).abs();
        }
        let b = i64::from(at(bias, o)) - i64::from(x_zero) * sum;
        // Every partial sum, in any order, within i32.
        if b.abs() + magnitude * widest > i64::from(i32::MAX) {
            return None;
        }
        bias_c.push(b as i32);
        let ks = if k_scale.len() == 1 {
            k_scale[0]
        } else {
            k_scale[o]
        };
        // In this order, as tract and the depthwise kernel combine them.
        scale.push(ks * x_scale / y_scale);
    }
    // Tiles at the last output channels read past them: zeros, never stored.
    bias_c.resize(rows, 0);
    scale.resize(rows, 0.0);
    Some((packed, bias_c, scale))
}

#[cfg(test)]
mod tests {
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;

    use super::super::depthwise::tests::Lcg;
    use super::super::install_with;
    use super::super::quant::tests::ints;
    use super::super::Isa;
    use super::*;

    /// Every instruction set this CPU can run the op with. `SHELFWATCH_REQUIRE_DOT`
    /// (`scripts/test-arm.sh` sets it where the emulated CPU has the dot product) names
    /// one that must be among them, so a run meant to prove it cannot quietly test only
    /// the plain-Rust kernel.
    fn isas() -> Vec<DotIsa> {
        let mut v = vec![DotIsa::Generic];
        v.extend(DotIsa::detect());
        if let Ok(required) = std::env::var("SHELFWATCH_REQUIRE_DOT") {
            assert!(
                v.iter().any(|i| i.name() == required),
                "SHELFWATCH_REQUIRE_DOT={required}, but this CPU offers {v:?}"
            );
        }
        v
    }

    #[derive(Debug, Clone, Copy)]
    struct Case {
        c: usize,
        m: usize,
        h: usize,
        w: usize,
        channels_last: bool,
        per_channel: bool,
        input: Byte,
        output: Byte,
        /// u8 weights around 128 instead of symmetric i8 ones.
        u8_weights: bool,
        /// Products far beyond the output's range (past 2^22, where `requantise`
        /// clamps before rounding).
        huge: bool,
    }

    struct Layer {
        /// The input's bytes (u8, or i8's two's complement).
        x: Vec<u8>,
        /// Weights as integers of their type.
        kernel: Vec<i32>,
        bias: Vec<i32>,
        x0: i32,
        x_scale: f32,
        k0: Vec<i32>,
        k_scale: Vec<f32>,
        y0: i32,
        y_scale: f32,
    }

    fn range(b: Byte) -> (i32, i32) {
        match b {
            Byte::U8 => (0, 255),
            Byte::I8 => (-128, 127),
        }
    }

    fn layer(rng: &mut Lcg, case: &Case) -> Layer {
        let n = if case.per_channel { case.m } else { 1 };
        let (x_lo, x_hi) = range(case.input);
        let (y_lo, y_hi) = range(case.output);
        let (kernel, k0) = if case.u8_weights {
            (ints(rng, case.m * case.c, 0, 255), ints(rng, n, 128, 128))
        } else {
            (ints(rng, case.m * case.c, -128, 127), vec![0; n])
        };
        let (x_scale, k_scale) = (0.02, 0.003);
        // Spread the outputs over the whole 8-bit range, past both ends.
        let typical = (case.c as f32).sqrt() * 128.0 * 74.0;
        Layer {
            x: ints(rng, case.c * case.h * case.w, x_lo, x_hi)
                .into_iter()
                .map(|v| v as u8)
                .collect(),
            kernel,
            bias: ints(rng, case.m, -20_000, 20_000),
            x0: ints(rng, 1, x_lo, x_hi)[0],
            x_scale,
            k0,
            k_scale: (0..n).map(|i| k_scale + 0.0002 * i as f32).collect(),
            y0: ints(rng, 1, y_lo, y_hi)[0],
            y_scale: x_scale * k_scale * typical / if case.huge { 1e8 } else { 100.0 },
        }
    }

    fn bytes(b: Byte, v: &[i32], shape: &[usize]) -> Tensor {
        match b {
            Byte::U8 => tract_ndarray::ArrayD::from_shape_vec(
                shape.to_vec(),
                v.iter().map(|&v| v as u8).collect(),
            )
            .unwrap()
            .into_tensor(),
            Byte::I8 => tract_ndarray::ArrayD::from_shape_vec(
                shape.to_vec(),
                v.iter().map(|&v| v as i8).collect(),
            )
            .unwrap()
            .into_tensor(),
        }
    }

    fn input_shape(case: &Case) -> Vec<usize> {
        if case.channels_last {
            vec![1, case.h, case.w, case.c]
        } else {
            vec![1, case.c, case.h, case.w]
        }
    }

    fn input_tensor(case: &Case, l: &Layer) -> Tensor {
        let v: Vec<i32> =
            l.x.iter()
                .map(|&b| match case.input {
                    Byte::U8 => b as i32,
                    Byte::I8 => b as i8 as i32,
                })
                .collect();
        bytes(case.input, &v, &input_shape(case))
    }

    /// The model tract-onnx makes of a 1x1 QLinearConv.
    fn model(case: &Case, l: &Layer) -> TypedModel {
        let mut m = TypedModel::default();
        let x = m
            .add_source("x", case.input.datum().fact(input_shape(case)))
            .unwrap();
        let konst = |m: &mut TypedModel, name: &str, t: Tensor| m.add_const(name, t).unwrap();
        let weights = if case.u8_weights { Byte::U8 } else { Byte::I8 };
        let kernel = bytes(weights, &l.kernel, &[case.m, case.c, 1, 1]);
        let vector_i = |v: &[i32]| {
            if v.len() == 1 {
                tensor0(v[0])
            } else {
                tensor1(v)
            }
        };
        let vector_f = |v: &[f32]| {
            if v.len() == 1 {
                tensor0(v[0])
            } else {
                tensor1(v)
            }
        };
        let inputs = [
            x,
            konst(&mut m, "k", kernel),
            konst(&mut m, "b", tensor1(&l.bias)),
            konst(&mut m, "x0", tensor0(l.x0)),
            konst(&mut m, "x_scale", tensor0(l.x_scale)),
            konst(&mut m, "k0", vector_i(&l.k0)),
            konst(&mut m, "k_scale", vector_f(&l.k_scale)),
            konst(&mut m, "y0", tensor0(l.y0)),
            konst(&mut m, "y_scale", tensor0(l.y_scale)),
        ];
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: if case.channels_last {
                    DataFormat::NHWC
                } else {
                    DataFormat::NCHW
                },
                kernel_shape: tvec![1, 1],
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: None,
                input_channels: case.c,
                output_channels: case.m,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: Some(case.output.datum()),
        };
        let y = m.wire_node("conv", conv, &inputs).unwrap()[0];
        m.select_output_outlets(&[y]).unwrap();
        m
    }

    /// The same arithmetic in plain integers: the i32 sum of (x - x0)(k - k0) plus the
    /// bias; then the scale in f32, rounded half to even, plus y0, saturated. Output
    /// values as integers, in the layout of the input.
    fn reference(case: &Case, l: &Layer) -> Vec<i32> {
        let (c, m, n) = (case.c, case.m, case.h * case.w);
        let (lo, hi) = range(case.output);
        let xv = |ch: usize, p: usize| {
            let b = if case.channels_last {
                l.x[p * c + ch]
            } else {
                l.x[ch * n + p]
            };
            match case.input {
                Byte::U8 => b as i32,
                Byte::I8 => b as i8 as i32,
            }
        };
        let mut out = vec![0; m * n];
        for o in 0..m {
            let pick = |v: &[i32]| if v.len() == 1 { v[0] } else { v[o] };
            let ks = if l.k_scale.len() == 1 {
                l.k_scale[0]
            } else {
                l.k_scale[o]
            };
            let scale = ks * l.x_scale / l.y_scale;
            for p in 0..n {
                let mut acc = l.bias[o];
                for ch in 0..c {
                    acc += (xv(ch, p) - l.x0) * (l.kernel[o * c + ch] - pick(&l.k0));
                }
                let v = ((acc as f32) * scale).clamp(-ROUND_RANGE, ROUND_RANGE);
                let v = (v.round_ties_even() as i32 + l.y0).clamp(lo, hi);
                out[if case.channels_last {
                    p * m + o
                } else {
                    o * n + p
                }] = v;
            }
        }
        out
    }

    fn run(m: TypedModel, input: &Tensor, output: Byte) -> Vec<i32> {
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        let out = plan
            .run(tvec!(input.clone().into_tvalue()))
            .unwrap()
            .remove(0);
        let view = out.try_as_plain_ram().unwrap();
        match output {
            Byte::U8 => view
                .as_slice::<u8>()
                .unwrap()
                .iter()
                .map(|&v| v as i32)
                .collect(),
            Byte::I8 => view
                .as_slice::<i8>()
                .unwrap()
                .iter()
                .map(|&v| v as i32)
                .collect(),
        }
    }

    fn cases() -> Vec<Case> {
        let mut cases = Vec::new();
        // Channel counts across the 4-byte groups and the tiles (8 and 16 lanes, 4 and 8
        // rows), pixel counts across the tiles, both layouts, every signedness.
        let shapes = [
            (1, 1, 1, 1),
            (3, 5, 2, 3),
            (4, 8, 4, 4),
            (7, 17, 3, 5),
            (16, 24, 5, 7),
            (37, 33, 6, 9),
            (64, 9, 9, 11),
        ];
        for (i, &(c, m, h, w)) in shapes.iter().enumerate() {
            for channels_last in [false, true] {
                let input = if i % 2 == 0 { Byte::U8 } else { Byte::I8 };
                let output = if (i / 2) % 2 == 0 { Byte::U8 } else { Byte::I8 };
                cases.push(Case {
                    c,
                    m,
                    h,
                    w,
                    channels_last,
                    per_channel: i % 3 != 1,
                    input,
                    output,
                    u8_weights: i % 3 == 1,
                    huge: i == 4,
                });
            }
        }
        cases
    }

    #[test]
    fn the_int8_pointwise_kernel_equals_the_integer_arithmetic_and_tracts_op_to_one_step() {
        let mut rng = Lcg(41);
        let (mut values, mut off_by_one) = (0usize, 0usize);
        let (mut saw_lo, mut saw_hi) = (false, false);
        for (i, case) in cases().into_iter().enumerate() {
            let l = layer(&mut rng, &case);
            let m = model(&case, &l);
            let input = input_tensor(&case, &l);
            let want = reference(&case, &l);
            let tract_out = run(m.clone(), &input, case.output);
            for isa in isas() {
                // As shelfwatch loads a model: decluttered (tract makes the 1x1
                // convolution a matrix product), then the kernels installed.
                let mut ours = m.clone().into_decluttered().unwrap();
                let installed = install_with(&mut ours, Isa::Generic, Some(isa)).unwrap();
                assert_eq!(installed.quant_pointwise, 1, "case {i} {case:?}");
                let got = run(ours, &input, case.output);
                assert_eq!(got, want, "case {i} {isa:?} {case:?}");
                for (a, b) in got.iter().zip(&tract_out) {
                    assert!(
                        a.abs_diff(*b) <= 1,
                        "case {i} {case:?}: {a} vs tract's {b}, more than one step"
                    );
                    off_by_one += (a != b) as usize;
                    values += 1;
                }
                let (lo, hi) = range(case.output);
                saw_lo |= got.contains(&lo);
                saw_hi |= got.contains(&hi);
            }
        }
        assert!(saw_lo && saw_hi, "saturation at both ends was exercised");
        assert!(
            off_by_one * 100 < values,
            "{off_by_one} of {values} differ from tract's"
        );
    }

    #[test]
    fn the_dot_product_kernels_agree_with_the_reference_on_wide_layers_across_threads() {
        // MobileNet's widest pointwise layers (960 -> 320, 64 -> 384) on enough pixels
        // that tract's pool splits the rows between two threads.
        let mut rng = Lcg(43);
        let pool = tract_linalg::multithread::Executor::multithread(2);
        for (c, m, channels_last) in [(960, 40, false), (64, 384, true), (96, 24, false)] {
            let case = Case {
                c,
                m,
                h: 19,
                w: 19,
                channels_last,
                per_channel: true,
                input: Byte::U8,
                output: Byte::U8,
                u8_weights: false,
                huge: false,
            };
            let l = layer(&mut rng, &case);
            let input = input_tensor(&case, &l);
            let want = reference(&case, &l);
            for isa in isas() {
                let mut ours = model(&case, &l).into_decluttered().unwrap();
                let installed = install_with(&mut ours, Isa::Generic, Some(isa)).unwrap();
                assert_eq!(installed.quant_pointwise, 1);
                let got = tract_linalg::multithread::multithread_tract_scope(pool.clone(), || {
                    run(ours, &input, case.output)
                });
                assert_eq!(got, want, "{c} -> {m} {isa:?}");
            }
        }
    }

    #[test]
    fn a_layer_whose_weights_do_not_fit_in_i8_after_their_zero_point_is_left_to_tract() {
        let mut rng = Lcg(47);
        let case = Case {
            c: 8,
            m: 4,
            h: 3,
            w: 3,
            channels_last: false,
            per_channel: false,
            input: Byte::U8,
            output: Byte::U8,
            u8_weights: true,
            huge: false,
        };
        let mut l = layer(&mut rng, &case);
        // 255 - 100 = 155: beyond i8.
        l.k0 = vec![100];
        l.kernel[3] = 255;
        let mut m = model(&case, &l).into_decluttered().unwrap();
        let installed = install_with(&mut m, Isa::Generic, Some(DotIsa::Generic)).unwrap();
        assert_eq!(installed.quant_pointwise, 0);
        assert_eq!(m.nodes().iter().filter(|n| n.op_is::<EinSum>()).count(), 1);
    }
}
