//! int8 depthwise convolutions with their requantisation fused, so that an int8 model
//! stays 8-bit from one matrix product to the next.
//!
//! tract runs a quantised depthwise convolution (ONNX `QLinearConv` with one group per
//! channel) as im2col, an int8 matrix product of one row per channel, and a
//! requantisation of five element-wise passes: four times its float layer's time
//! (models/README.md). Kept in float instead, each one sat in a float island of
//! `DequantizeLinear` and `QuantizeLinear` passes that cost more than the int8 matrix
//! products saved. [`QuantDepthwiseConv`] takes the 8-bit input and writes the 8-bit
//! output in one node.
//!
//! The arithmetic is integer arithmetic carried in f32 lanes. The input minus its zero
//! point (at most 255 in magnitude) times the weight minus its zero point (at most 255),
//! summed over at most 25 taps, plus the i32 bias, is an integer below 2^24 in
//! magnitude, and f32 holds every such integer exactly whatever the order of the sums
//! and whether they are fused multiply-adds. [`install`] checks that bound per layer
//! from the actual weights, zero points and bias, and leaves a layer that could exceed
//! it to tract. So the f32 kernels of [`super::depthwise`], already proven against
//! tract on every target (AVX2+FMA, NEON, armv7 NEON assembly), compute the exact i32
//! accumulator, and no second set of SIMD kernels is needed. The requantisation is then
//! `clamp(round_half_to_even(acc * scale) + y_zero_point)` with `scale = x_scale *
//! w_scale / y_scale` in f32: what onnxruntime's `QLinearConv` computes. tract's own
//! requantisation multiplies by a fixed-point approximation of the scale, so it can
//! differ from both by one step on a few values.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::depthwise::{self, Clamp, Geometry, Isa};

/// The largest integer magnitude the accumulator may reach: f32 is exact up to 2^24.
const EXACT: f64 = (1u32 << 24) as f64;

/// Adding then subtracting 1.5 * 2^23 rounds any |v| <= 2^22 to the nearest integer,
/// ties to even (the default rounding of IEEE arithmetic), in two vectorisable
/// operations: `f32::round_ties_even` is a libm call on the x86_64 baseline.
const ROUNDER: f32 = 12_582_912.0;
const ROUND_RANGE: f32 = 4_194_304.0;

/// An 8-bit element type: the input's and the output's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Byte {
    U8,
    I8,
}

impl Byte {
    /// Plain 8-bit types only: a tensor type carrying its own quantisation (tract's
    /// QU8/QI8) would need those parameters kept on the output, which this op does not do.
    pub(super) fn of(dt: DatumType) -> Option<Byte> {
        match dt {
            DatumType::U8 => Some(Byte::U8),
            DatumType::I8 => Some(Byte::I8),
            _ => None,
        }
    }

    pub(super) fn datum(self) -> DatumType {
        match self {
            Byte::U8 => u8::datum_type(),
            Byte::I8 => i8::datum_type(),
        }
    }

    /// The values it holds, as floats.
    fn range(self) -> (f32, f32) {
        match self {
            Byte::U8 => (0.0, 255.0),
            Byte::I8 => (-128.0, 127.0),
        }
    }
}

/// Reads 8-bit values as floats, writes integral floats back.
trait Element: Datum + Copy {
    fn to_f32(self) -> f32;
    /// `v` is integral and within the type's range. `v + 1.5 * 2^23` has `v` (two's
    /// complement, modulo 2^22) in its low mantissa bits: a bit cast and a truncation,
    /// where `as u8` would be a saturating conversion the compiler does not vectorise.
    fn from_f32(v: f32) -> Self;
}

impl Element for u8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        (v + ROUNDER).to_bits() as u8
    }
}

impl Element for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        (v + ROUNDER).to_bits() as u8 as i8
    }
}

/// The requantisation of one accumulator: `clamp(round_half_to_even(acc * scale) + zero)`.
/// `acc` is an exact integer; the clamp before rounding keeps the rounding trick in its
/// range and cannot change the result (anything beyond 2^22 saturates anyway).
#[inline(always)]
fn requantise(acc: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> f32 {
    let v = (acc * scale).clamp(-ROUND_RANGE, ROUND_RANGE);
    let r = (v + ROUNDER) - ROUNDER;
    (r + zero).clamp(lo, hi)
}

/// The element-wise passes around the f32 kernel: plain loops the compiler vectorises,
/// compiled for AVX2 where [`Isa::Avx2Fma`] runs (the x86_64 baseline is SSE2) and for
/// the baseline elsewhere (NEON on aarch64 and on our armv7 build).
#[derive(Clone, Copy)]
struct Passes {
    // Only x86_64 compiles a second variant to choose from.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    isa: Isa,
    zero_in: f32,
    zero_out: f32,
    lo: f32,
    hi: f32,
}

impl Passes {
    /// `dst = src - zero_in`, widened.
    fn widen<I: Element>(self, src: &[I], dst: &mut [f32]) {
        #[inline(always)]
        fn body<I: Element>(src: &[I], dst: &mut [f32], zero: f32) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32() - zero;
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<I: Element>(src: &[I], dst: &mut [f32], zero: f32) {
            body(src, dst, zero)
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2Fma {
            // SAFETY: Isa::Avx2Fma is only made where AVX2 and FMA are present.
            return unsafe { avx2(src, dst, self.zero_in) };
        }
        body(src, dst, self.zero_in)
    }

    /// `dst = requantise(acc, scale)`, the scales repeating every `scales.len()` values
    /// (one per channel in channels-last rows; one scale for a whole plane).
    fn narrow<O: Element>(self, acc: &[f32], scales: &[f32], dst: &mut [O]) {
        #[inline(always)]
        fn body<O: Element>(acc: &[f32], scales: &[f32], dst: &mut [O], p: Passes) {
            if let [scale] = scales {
                for (d, &a) in dst.iter_mut().zip(acc) {
                    *d = O::from_f32(requantise(a, *scale, p.zero_out, p.lo, p.hi));
                }
                return;
            }
            for (d, a) in dst
                .chunks_exact_mut(scales.len())
                .zip(acc.chunks_exact(scales.len()))
            {
                for ((d, &a), &s) in d.iter_mut().zip(a).zip(scales) {
                    *d = O::from_f32(requantise(a, s, p.zero_out, p.lo, p.hi));
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<O: Element>(acc: &[f32], scales: &[f32], dst: &mut [O], p: Passes) {
            body(acc, scales, dst, p)
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2Fma {
            // SAFETY: Isa::Avx2Fma is only made where AVX2 and FMA are present.
            return unsafe { avx2(acc, scales, dst, self) };
        }
        body(acc, scales, dst, self)
    }
}

/// A quantised depthwise convolution with its requantisation: 8-bit NCHW (or CHW) or
/// NHWC (HWC) in, 8-bit out.
#[derive(Debug, Clone)]
pub struct QuantDepthwiseConv {
    geometry: Geometry,
    channels_last: bool,
    batch: usize,
    channels: usize,
    input: Byte,
    output: Byte,
    /// The input's zero point.
    x_zero: f32,
    /// Weights minus their zero point: `channels x kh x kw` (or `kh x kw x channels`).
    weights: Arc<[f32]>,
    /// The i32 bias, one per channel (exact in f32: checked by `install`).
    bias: Arc<[f32]>,
    /// `x_scale * w_scale / y_scale`, one per channel.
    scale: Arc<[f32]>,
    /// The output's zero point.
    y_zero: f32,
    isa: Isa,
    output_shape: TVec<usize>,
}

impl PartialEq for QuantDepthwiseConv {
    fn eq(&self, other: &Self) -> bool {
        let bits = super::bits;
        self.geometry == other.geometry
            && self.channels_last == other.channels_last
            && self.batch == other.batch
            && self.channels == other.channels
            && self.input == other.input
            && self.output == other.output
            && self.x_zero.to_bits() == other.x_zero.to_bits()
            && self.y_zero.to_bits() == other.y_zero.to_bits()
            && self.isa == other.isa
            && self.output_shape == other.output_shape
            && bits(&self.weights) == bits(&other.weights)
            && bits(&self.bias) == bits(&other.bias)
            && bits(&self.scale) == bits(&other.scale)
    }
}
impl Eq for QuantDepthwiseConv {}

/// `shelfwatch_dw_q8_<isa>`, e.g. `shelfwatch_dw_q8_neon` on a Raspberry Pi.
pub fn kernel_name(isa: Isa) -> String {
    format!("shelfwatch_dw_q8_{}", isa.name())
}

impl QuantDepthwiseConv {
    /// The kernel's name as `shelfwatch bench` and the platform tests print it.
    pub fn kernel_name(&self) -> String {
        kernel_name(self.isa)
    }

    fn run<I: Element, O: Element>(&self, x: &[I]) -> TractResult<Tensor> {
        let g = self.geometry;
        let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
        let planes = self.batch * self.channels;
        ensure!(
            x.len() == planes * plane_in,
            "quantised depthwise input has {} values, expected {}",
            x.len(),
            planes * plane_in
        );
        let (lo, hi) = self.output.range();
        let passes = Passes {
            isa: self.isa,
            zero_in: self.x_zero,
            zero_out: self.y_zero,
            lo,
            hi,
        };
        // SAFETY: every value of the output is written below (whole planes, or whole
        // rows, covering the tensor).
        let mut output = unsafe { Tensor::uninitialized::<O>(&self.output_shape)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<O>()?;
            if self.channels_last {
                self.run_channels_last(x, out, passes)?;
            } else {
                let kk = g.kh * g.kw;
                tract_linalg::multithread::par_chunks_mut(
                    out,
                    plane_out,
                    planes * plane_out,
                    |first, chunk| {
                        let mut scratch = Vec::with_capacity(g.scratch_len());
                        let mut xin = vec![0f32; plane_in];
                        let mut acc = vec![0f32; plane_out];
                        for (i, o) in chunk.chunks_exact_mut(plane_out).enumerate() {
                            let p = first + i;
                            let c = p % self.channels;
                            passes.widen(&x[p * plane_in..(p + 1) * plane_in], &mut xin);
                            depthwise::plane(
                                self.isa,
                                &g,
                                &xin,
                                &self.weights[c * kk..(c + 1) * kk],
                                self.bias[c],
                                Clamp::NONE,
                                &mut acc,
                                &mut scratch,
                            );
                            passes.narrow(&acc, &self.scale[c..c + 1], o);
                        }
                        Ok(())
                    },
                )?;
            }
        }
        Ok(output)
    }

    /// NHWC: the whole input is widened once (the kernel reads across rows), output rows
    /// are shared out over tract's pool and requantised as they are made.
    fn run_channels_last<I: Element, O: Element>(
        &self,
        x: &[I],
        out: &mut [O],
        passes: Passes,
    ) -> TractResult<()> {
        let g = self.geometry;
        let c = self.channels;
        let mut xin = vec![0f32; x.len()];
        passes.widen(x, &mut xin);
        let total = out.len();
        tract_linalg::multithread::par_chunks_mut(out, g.ow * c, total, |first, chunk| {
            let mut acc = vec![0f32; chunk.len()];
            super::hwc_rows(
                self.isa,
                &g,
                c,
                &xin,
                &self.weights,
                &self.bias,
                Clamp::NONE,
                &mut acc,
                first,
            );
            passes.narrow(&acc, &self.scale, chunk);
            Ok(())
        })
    }
}

impl Op for QuantDepthwiseConv {
    fn name(&self) -> StaticName {
        "ShelfwatchQuantDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}x{} stride {}x{} pad {}x{} on {}x{}x{}, {:?} -> {:?}, {}",
            g.kh,
            g.kw,
            g.sh,
            g.sw,
            g.pad_top,
            g.pad_left,
            self.channels,
            g.h,
            g.w,
            self.input,
            self.output,
            self.kernel_name()
        )])
    }

    fn validation(&self) -> Validation {
        // Requantised with the exact scale, tract with a fixed-point one: one step apart
        // on a few values.
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QuantDepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.try_as_plain_ram()?;
        let output = match (self.input, self.output) {
            (Byte::U8, Byte::U8) => self.run::<u8, u8>(view.as_slice::<u8>()?)?,
            (Byte::U8, Byte::I8) => self.run::<u8, i8>(view.as_slice::<u8>()?)?,
            (Byte::I8, Byte::U8) => self.run::<i8, u8>(view.as_slice::<i8>()?)?,
            (Byte::I8, Byte::I8) => self.run::<i8, i8>(view.as_slice::<i8>()?)?,
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for QuantDepthwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && Byte::of(inputs[0].datum_type) == Some(self.input));
        Ok(tvec!(self.output.datum().fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        let macs = self.batch * self.channels * g.oh * g.ow * g.kh * g.kw;
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.to_dim())))
    }

    as_op!();
}

/// One constant input of the convolution as f32 values (zero points and scales may be
/// scalars or one per channel), or None when it is not a constant.
pub(super) fn konst_f32(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Vec<f32>>> {
    let Some(k) = model.outlet_fact(outlet)?.konst.clone() else {
        return Ok(None);
    };
    let k = k.cast_to::<f32>()?;
    let view = k.try_as_plain_ram()?;
    Ok(Some(view.as_slice::<f32>()?.to_vec()))
}

/// `values` for channel `c`: scalars apply to every channel.
fn per_channel(values: &[f32], c: usize) -> f32 {
    if values.len() == 1 {
        values[0]
    } else {
        values[c]
    }
}

/// Per channel: the weights minus their zero point, the bias and the combined scale;
/// None when a channel's accumulator could leave f32's exact integers for some input.
/// `q` holds the bias, x0, x_scale, k0, k_scale, y0 and y_scale.
#[allow(clippy::type_complexity)]
fn requantised_taps(
    kernel: &Tensor,
    c: usize,
    kk: usize,
    input: Byte,
    q: &[Vec<f32>],
) -> TractResult<Option<(Vec<f32>, Vec<f32>, Vec<f32>)>> {
    let [bias, x0, x_scale, k0, k_scale, _, y_scale] = q else {
        return Ok(None);
    };
    let kernel = kernel.cast_to::<f32>()?;
    let kernel = kernel.try_as_plain_ram()?;
    let kernel = kernel.as_slice::<f32>()?;
    let (in_lo, in_hi) = input.range();
    let x_zero = x0[0];
    let widest_input = f64::from((x_zero - in_lo).abs().max((in_hi - x_zero).abs()));
    let mut oihw = Vec::with_capacity(c * kk);
    let mut scale = Vec::with_capacity(c);
    let mut bias_c = Vec::with_capacity(c);
    for ch in 0..c {
        let zero = per_channel(k0, ch);
        let taps: Vec<f32> = kernel[ch * kk..(ch + 1) * kk]
            .iter()
            .map(|&k| k - zero)
            .collect();
        let b = per_channel(bias, ch);
        let bound = f64::from(b).abs()
            + taps.iter().map(|&t| f64::from(t).abs()).sum::<f64>() * widest_input;
        if bound >= EXACT {
            return Ok(None);
        }
        oihw.extend(taps);
        bias_c.push(b);
        // In this order, as tract combines them (k_scale * x_scale, then / y_scale).
        scale.push(per_channel(k_scale, ch) * x_scale[0] / y_scale[0]);
    }
    Ok(Some((oihw, bias_c, scale)))
}

/// The [`QuantDepthwiseConv`] for a quantised tract `Conv` node, if it is one we run
/// exactly: 8-bit data, constant weights, bias, zero points and scales, a layout the
/// kernels take, and an accumulator that stays below 2^24 for every input.
pub(super) fn quant_depthwise_of(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    isa: Isa,
) -> TractResult<Option<QuantDepthwiseConv>> {
    let spec = &conv.pool_spec;
    let channels = spec.input_channels;
    let Some(out_dt) = conv.q_params else {
        return Ok(None);
    };
    if conv.group < 2
        || conv.group != channels
        || spec.output_channels != channels
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.rank() != 2
        || spec.dilations().iter().any(|&d| d != 1)
        || node.inputs.len() != 9
    {
        return Ok(None);
    }
    let input_fact = model.outlet_fact(node.inputs[0])?;
    let (Some(input), Some(output)) = (Byte::of(input_fact.datum_type), Byte::of(out_dt)) else {
        return Ok(None);
    };
    let Some(shape) = input_fact.shape.as_concrete() else {
        return Ok(None);
    };
    let (batch, c, h, w, channels_last) = match (spec.data_format, shape) {
        (DataFormat::NCHW, &[n, c, h, w]) => (n, c, h, w, false),
        (DataFormat::CHW, &[c, h, w]) => (1, c, h, w, false),
        (DataFormat::NHWC, &[n, h, w, c]) => (n, c, h, w, true),
        (DataFormat::HWC, &[h, w, c]) => (1, c, h, w, true),
        _ => return Ok(None),
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let Some(kernel) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
        return Ok(None);
    };
    if c != channels || kernel.shape() != [c, 1, kh, kw] || Byte::of(kernel.datum_type()).is_none()
    {
        return Ok(None);
    }
    let mut q = Vec::with_capacity(7);
    for &i in &node.inputs[2..9] {
        match konst_f32(model, i)? {
            Some(v) if v.len() == 1 || v.len() == c => q.push(v),
            _ => return Ok(None),
        }
    }
    // Scalars: the input's and the output's zero points and scales (per-tensor
    // activations); the weights' may be per channel.
    if [1, 2, 5, 6].iter().any(|&i| q[i].len() != 1) {
        return Ok(None);
    }
    let (x_zero, y_zero) = (q[1][0], q[5][0]);
    let kk = kh * kw;
    let Some((oihw, bias_c, scale)) = requantised_taps(&kernel, c, kk, input, &q)? else {
        return Ok(None);
    };
    let Some((geometry, output_shape)) = super::geometry_of(model, node, spec, batch, c, h, w)?
    else {
        return Ok(None);
    };
    let weights: Arc<[f32]> = if channels_last {
        (0..kk * c).map(|i| oihw[(i % c) * kk + i / c]).collect()
    } else {
        oihw.into()
    };
    Ok(Some(QuantDepthwiseConv {
        geometry,
        channels_last,
        batch,
        channels: c,
        input,
        output,
        x_zero,
        weights,
        bias: bias_c.into(),
        scale: scale.into(),
        y_zero,
        isa,
        output_shape,
    }))
}

#[cfg(test)]
pub(super) mod tests {
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    use super::super::depthwise::tests::Lcg;
    use super::super::install;
    use super::*;

    /// Uniform integers in `lo..=hi` from the kernel tests' generator.
    pub(in super::super) fn ints(rng: &mut Lcg, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        (0..n)
            .map(|_| {
                let u = (rng.next() + 1.0) / 2.0; // rng.next() is in [-1, 1)
                (lo + (u * (hi - lo + 1) as f32) as i32).min(hi)
            })
            .collect()
    }

    struct Case {
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        padding: PaddingSpec,
        channels_last: bool,
        per_channel: bool,
    }

    /// The quantisation of one random layer.
    struct Layer {
        x: Vec<u8>,
        kernel: Vec<i8>,
        bias: Vec<i32>,
        x0: i32,
        x_scale: f32,
        k0: Vec<i32>,
        k_scale: Vec<f32>,
        y0: i32,
        y_scale: f32,
    }

    fn layer(rng: &mut Lcg, case: &Case) -> Layer {
        let n = if case.per_channel { case.c } else { 1 };
        Layer {
            x: ints(rng, case.c * case.h * case.w, 0, 255)
                .into_iter()
                .map(|v| v as u8)
                .collect(),
            kernel: ints(rng, case.c * case.k * case.k, -127, 127)
                .into_iter()
                .map(|v| v as i8)
                .collect(),
            bias: ints(rng, case.c, -20_000, 20_000),
            x0: ints(rng, 1, 0, 255)[0],
            x_scale: 0.02,
            k0: if case.per_channel {
                vec![0; n]
            } else {
                ints(rng, 1, -10, 10)
            },
            k_scale: (0..n).map(|i| 0.003 + 0.0007 * i as f32).collect(),
            y0: ints(rng, 1, 0, 255)[0],
            // small enough that some outputs saturate at both ends
            y_scale: 0.012,
        }
    }

    /// The model tract-onnx makes of a QLinearConv with one group per channel.
    fn model(case: &Case, l: &Layer) -> TypedModel {
        let mut m = TypedModel::default();
        let (c, h, w, k) = (case.c, case.h, case.w, case.k);
        let (shape, format): (Vec<usize>, _) = if case.channels_last {
            (vec![h, w, c], DataFormat::HWC)
        } else {
            (vec![1, c, h, w], DataFormat::NCHW)
        };
        let x = m.add_source("x", u8::fact(&shape)).unwrap();
        let konst = |m: &mut TypedModel, name: &str, t: Tensor| m.add_const(name, t).unwrap();
        let kernel = tract_ndarray::ArrayD::from_shape_vec(vec![c, 1, k, k], l.kernel.clone())
            .unwrap()
            .into_tensor();
        let vector = |v: &[f32]| {
            if v.len() == 1 {
                tensor0(v[0])
            } else {
                tensor1(v)
            }
        };
        let k0: Vec<f32> = l.k0.iter().map(|&v| v as f32).collect();
        let inputs = [
            x,
            konst(&mut m, "k", kernel),
            konst(&mut m, "b", tensor1(&l.bias)),
            konst(&mut m, "x0", tensor0(l.x0)),
            konst(&mut m, "x_scale", tensor0(l.x_scale)),
            konst(
                &mut m,
                "k0",
                vector(&k0).cast_to::<i32>().unwrap().into_owned(),
            ),
            konst(&mut m, "k_scale", vector(&l.k_scale)),
            konst(&mut m, "y0", tensor0(l.y0)),
            konst(&mut m, "y_scale", tensor0(l.y_scale)),
        ];
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: format,
                kernel_shape: tvec![k, k],
                padding: case.padding.clone(),
                dilations: None,
                strides: Some(tvec![case.s, case.s]),
                input_channels: c,
                output_channels: c,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: c,
            q_params: Some(u8::datum_type()),
        };
        let y = m.wire_node("conv", conv, &inputs).unwrap()[0];
        m.select_output_outlets(&[y]).unwrap();
        m
    }

    /// The same arithmetic in plain integers: the i32 accumulator of (x - x0)(k - k0)
    /// over the taps inside the input, plus the bias; then the scale in f32, rounded half
    /// to even, plus y0, clamped to u8. Output `[oh][ow][c]` (channels last) or
    /// `[c][oh][ow]`.
    fn reference(case: &Case, l: &Layer, g: &Geometry) -> Vec<u8> {
        let (c, kk) = (case.c, case.k * case.k);
        let mut out = vec![0u8; c * g.oh * g.ow];
        for ch in 0..c {
            let k0 = l.k0[if case.per_channel { ch } else { 0 }];
            let ks = l.k_scale[if case.per_channel { ch } else { 0 }];
            let scale = ks * l.x_scale / l.y_scale;
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut acc = l.bias[ch];
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let (y, x) = (
                                (oy * g.sh + ky) as isize - g.pad_top as isize,
                                (ox * g.sw + kx) as isize - g.pad_left as isize,
                            );
                            if y < 0 || x < 0 || y >= g.h as isize || x >= g.w as isize {
                                continue;
                            }
                            let (y, x) = (y as usize, x as usize);
                            let xv = if case.channels_last {
                                l.x[(y * g.w + x) * c + ch]
                            } else {
                                l.x[(ch * g.h + y) * g.w + x]
                            };
                            let kv = l.kernel[ch * kk + ky * g.kw + kx];
                            acc += (xv as i32 - l.x0) * (kv as i32 - k0);
                        }
                    }
                    let v = ((acc as f32) * scale).round_ties_even() + l.y0 as f32;
                    let v = v.clamp(0.0, 255.0) as u8;
                    let at = if case.channels_last {
                        (oy * g.ow + ox) * c + ch
                    } else {
                        (ch * g.oh + oy) * g.ow + ox
                    };
                    out[at] = v;
                }
            }
        }
        out
    }

    fn run(m: TypedModel, input: &Tensor) -> Vec<u8> {
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        let out = plan
            .run(tvec!(input.clone().into_tvalue()))
            .unwrap()
            .remove(0);
        out.try_as_plain_ram()
            .unwrap()
            .as_slice::<u8>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn the_int8_depthwise_kernel_equals_the_integer_arithmetic_and_tracts_op_to_one_step() {
        let mut rng = Lcg(29);
        let cases = [
            (3, 1, PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1])),
            (3, 2, PaddingSpec::Explicit(tvec![0, 0], tvec![1, 1])),
            (3, 2, PaddingSpec::SameUpper),
            (5, 1, PaddingSpec::Explicit(tvec![2, 2], tvec![2, 2])),
            (5, 2, PaddingSpec::Explicit(tvec![1, 1], tvec![2, 2])),
            (5, 2, PaddingSpec::Valid),
        ];
        let mut values = 0usize;
        let mut off_by_one = 0usize;
        for (i, (k, s, padding)) in cases.into_iter().enumerate() {
            for (channels_last, per_channel) in
                [(false, false), (false, true), (true, false), (true, true)]
            {
                let case = Case {
                    c: 4 + i * 5,
                    h: 7 + i * 3,
                    w: 9 + i * 7,
                    k,
                    s,
                    padding: padding.clone(),
                    channels_last,
                    per_channel,
                };
                let l = layer(&mut rng, &case);
                let m = model(&case, &l);
                let shape: Vec<usize> = if channels_last {
                    vec![case.h, case.w, case.c]
                } else {
                    vec![1, case.c, case.h, case.w]
                };
                let input = tract_ndarray::ArrayD::from_shape_vec(shape, l.x.clone())
                    .unwrap()
                    .into_tensor();
                let tract_out = run(m.clone(), &input);
                for isa in [Isa::Generic, Isa::detect()] {
                    let mut ours = m.clone();
                    let installed = install(&mut ours, isa).unwrap();
                    assert_eq!(installed.quant_depthwise, 1, "case {i}");
                    let op = ours
                        .nodes()
                        .iter()
                        .find_map(|n| n.op_as::<QuantDepthwiseConv>())
                        .expect("installed")
                        .clone();
                    let want = reference(&case, &l, &op.geometry);
                    let got = run(ours, &input);
                    assert_eq!(got, want, "case {i} {isa:?} channels last {channels_last}");
                    for (a, b) in got.iter().zip(&tract_out) {
                        assert!(
                            a.abs_diff(*b) <= 1,
                            "case {i}: {a} vs tract's {b}, more than one step"
                        );
                        off_by_one += (a != b) as usize;
                        values += 1;
                    }
                    // Saturation at both ends was exercised.
                    assert!(got.contains(&0) && got.contains(&255), "case {i}");
                }
            }
        }
        assert!(
            off_by_one * 100 < values,
            "{off_by_one} of {values} differ from tract's"
        );
    }

    #[test]
    fn a_layer_whose_sum_could_exceed_what_f32_holds_exactly_is_left_to_tract() {
        let mut rng = Lcg(5);
        let case = Case {
            c: 4,
            h: 6,
            w: 6,
            k: 3,
            s: 1,
            padding: PaddingSpec::SameUpper,
            channels_last: false,
            per_channel: false,
        };
        let mut l = layer(&mut rng, &case);
        // 2^24 - 1000: any input could push it past 2^24.
        l.bias[2] = 16_776_216;
        let mut m = model(&case, &l);
        let installed = install(&mut m, Isa::detect()).unwrap();
        assert_eq!(installed.quant_depthwise, 0);
        assert_eq!(m.nodes().iter().filter(|n| n.op_is::<Conv>()).count(), 1);
    }
}
