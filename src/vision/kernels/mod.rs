//! shelfwatch's own kernels for what tract runs slowly, put into the model as tract ops.
//!
//! [`install`] rewrites a decluttered model before tract optimises it: every f32
//! depthwise convolution our models use (3x3 and 5x5, stride 1 or 2, any explicit or
//! SAME padding, NCHW), together with the ReLU/ReLU6 clamp that follows it, becomes one
//! [`DepthwiseConv`] node running [`depthwise::plane`] with the instruction set the CPU
//! offers (AVX2+FMA on x86_64, NEON on aarch64; plain Rust elsewhere). In an int8
//! model, the quantised depthwise convolutions become [`QuantDepthwiseConv`] ([`quant`])
//! and, on a CPU with an 8-bit dot product (AVX-512 VNNI, Armv8.2 `dotprod`), the
//! quantised pointwise ones [`QuantPointwiseConv`] ([`pointwise`]). tract then optimises
//! the rest (f32 pointwise convolutions stay its matrix products, which are fast) and
//! leaves these nodes alone: they have no codegen of their own.
//!
//! The extension points used here (`TypedOp` outside tract, `TypedModelPatch`,
//! `Conv`'s public fields) are semi-internal in tract: the version is pinned in
//! Cargo.toml, and the tests compare every replaced node with tract's own op on the
//! bundled models, so an upgrade that changes them fails there, not in the field.

pub mod depthwise;
pub mod pointwise;
pub mod quant;
pub(crate) mod simd;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;

pub use depthwise::{Clamp, Geometry, Isa};
pub use pointwise::{DotIsa, QuantPointwiseConv};
pub use quant::QuantDepthwiseConv;

/// Which kernels run a model's depthwise convolutions (`[model] kernels`,
/// `--kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kernels {
    /// shelfwatch's own (this module), fused with their activation.
    #[default]
    Shelfwatch,
    /// tract's, as tract optimises the model by itself: for comparison, and a way back
    /// should a kernel ever misbehave on a board.
    Tract,
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shelfwatch" => Ok(Kernels::Shelfwatch),
            "tract" => Ok(Kernels::Tract),
            other => Err(format!("unknown kernels {other:?} (shelfwatch or tract)")),
        }
    }
}

/// A depthwise convolution with its bias and clamp, over NCHW (or CHW) f32, or over
/// NHWC (HWC), the layout tract's simplifications move convolutions to on some targets
/// (aarch64: every depthwise layer of the SSD but its first).
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    geometry: Geometry,
    /// Channels last (NHWC/HWC): `weights` are then `kh x kw x channels`.
    channels_last: bool,
    /// Planes per channel: the batch size (1 for our models).
    batch: usize,
    channels: usize,
    /// `channels x kh x kw`, row-major per channel (or `kh x kw x channels`).
    weights: Arc<[f32]>,
    /// One per channel.
    bias: Arc<[f32]>,
    clamp: Clamp,
    isa: Isa,
    output_shape: TVec<usize>,
}

impl PartialEq for DepthwiseConv {
    fn eq(&self, other: &Self) -> bool {
        self.geometry == other.geometry
            && self.channels_last == other.channels_last
            && self.batch == other.batch
            && self.channels == other.channels
            && self.isa == other.isa
            && self.clamp.lo.to_bits() == other.clamp.lo.to_bits()
            && self.clamp.hi.to_bits() == other.clamp.hi.to_bits()
            && self.output_shape == other.output_shape
            && bits(&self.weights) == bits(&other.weights)
            && bits(&self.bias) == bits(&other.bias)
    }
}
impl Eq for DepthwiseConv {}

impl DepthwiseConv {
    /// The kernel's name as `shelfwatch bench` and the platform tests print it.
    pub fn kernel_name(&self) -> String {
        kernel_name(self.isa)
    }
}

/// `shelfwatch_dw_f32_<isa>`, e.g. `shelfwatch_dw_f32_neon` on a Raspberry Pi.
pub fn kernel_name(isa: Isa) -> String {
    format!("shelfwatch_dw_f32_{}", isa.name())
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "ShelfwatchDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}x{} stride {}x{} pad {}x{} on {}x{}x{}, clamp [{}, {}], {}",
            g.kh,
            g.kw,
            g.sh,
            g.sw,
            g.pad_top,
            g.pad_left,
            self.channels,
            g.h,
            g.w,
            self.clamp.lo,
            self.clamp.hi,
            self.kernel_name()
        )])
    }

    fn validation(&self) -> Validation {
        // FMA and a different summation order than tract's: equal to rounding.
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let g = self.geometry;
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
        let planes = self.batch * self.channels;
        if self.channels_last {
            return self.eval_channels_last(x);
        }
        ensure!(
            x.len() == planes * plane_in,
            "depthwise input has {} values, expected {}",
            x.len(),
            planes * plane_in
        );
        // SAFETY: every value of the output is written below (`plane` writes whole
        // planes, and the planes cover the tensor).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            let kk = g.kh * g.kw;
            // Planes are independent: with tract's thread pool (`[model] threads` > 1)
            // they are shared out in runs of whole planes, as tract does for its own.
            tract_linalg::multithread::par_chunks_mut(
                out,
                plane_out,
                planes * plane_out,
                |first, chunk| {
                    let mut scratch = Vec::with_capacity(g.scratch_len());
                    for (i, o) in chunk.chunks_exact_mut(plane_out).enumerate() {
                        let p = first + i;
                        let c = p % self.channels;
                        depthwise::plane(
                            self.isa,
                            &g,
                            &x[p * plane_in..(p + 1) * plane_in],
                            &self.weights[c * kk..(c + 1) * kk],
                            self.bias[c],
                            self.clamp,
                            o,
                            &mut scratch,
                        );
                    }
                    Ok(())
                },
            )?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl DepthwiseConv {
    /// NHWC: output rows (of all channels) are shared out over tract's pool.
    fn eval_channels_last(&self, x: &[f32]) -> TractResult<TVec<TValue>> {
        let g = self.geometry;
        let c = self.channels;
        let (image_in, row) = (g.h * g.w * c, g.ow * c);
        ensure!(
            x.len() == self.batch * image_in,
            "depthwise input has {} values, expected {}",
            x.len(),
            self.batch * image_in
        );
        // SAFETY: every value of the output is written below (`hwc` writes whole rows,
        // and the rows cover the tensor).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = out_view.as_slice_mut::<f32>()?;
            let total = out.len();
            tract_linalg::multithread::par_chunks_mut(out, row, total, |first, chunk| {
                hwc_rows(
                    self.isa,
                    &g,
                    c,
                    x,
                    &self.weights,
                    &self.bias,
                    self.clamp,
                    chunk,
                    first,
                );
                Ok(())
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

/// [`depthwise::hwc`] over a run of whole output rows of a channels-last batch: `out`
/// holds the rows from `first` on, counted across the batch (row `r` is row `r % oh` of
/// image `r / oh`), as tract's pool hands them out; `x` is the whole batch.
#[allow(clippy::too_many_arguments)]
pub(super) fn hwc_rows(
    isa: Isa,
    g: &Geometry,
    c: usize,
    x: &[f32],
    weights: &[f32],
    bias: &[f32],
    clamp: Clamp,
    out: &mut [f32],
    first: usize,
) {
    let (image_in, row) = (g.h * g.w * c, g.ow * c);
    let (mut r, mut rest) = (first, out);
    while !rest.is_empty() {
        let (n, oy) = (r / g.oh, r % g.oh);
        let take = (g.oh - oy).min(rest.len() / row);
        let (head, tail) = rest.split_at_mut(take * row);
        depthwise::hwc(
            isa,
            g,
            c,
            &x[n * image_in..(n + 1) * image_in],
            weights,
            bias,
            clamp,
            head,
            oy..oy + take,
        );
        rest = tail;
        r += take;
    }
}

/// Bitwise, so that equality of ops holding floats stays reflexive.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        let macs = self.batch * self.channels * g.oh * g.ow * g.kh * g.kw;
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.to_dim())))
    }

    as_op!();
}

/// What [`install`] did to a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Depthwise convolutions now run by [`DepthwiseConv`].
    pub depthwise: usize,
    /// Of those, how many took the clamp after them in (ReLU6, ReLU).
    pub fused_clamps: usize,
    /// Quantised depthwise convolutions now run by [`QuantDepthwiseConv`].
    pub quant_depthwise: usize,
    /// Quantised pointwise convolutions now run by [`QuantPointwiseConv`].
    pub quant_pointwise: usize,
}

/// Replaces, in a decluttered model with concrete input shapes, every depthwise
/// convolution [`DepthwiseConv`] can run, with the clamps that follow it, by one
/// [`DepthwiseConv`] for `isa`, and every quantised one [`QuantDepthwiseConv`] runs
/// exactly by one of those. Convolutions they cannot run (dilated, other layouts,
/// symbolic shapes, quantised ones whose sums could exceed f32's exact integers) are
/// left to tract.
pub fn install(model: &mut TypedModel, isa: Isa) -> TractResult<Installed> {
    let dot = if isa == Isa::Generic {
        None
    } else {
        DotIsa::detect()
    };
    install_with(model, isa, dot)
}

/// [`install`] with the dot-product instruction set stated: quantised pointwise
/// convolutions are replaced only with one (`None`: they stay tract's).
pub fn install_with(
    model: &mut TypedModel,
    isa: Isa,
    dot: Option<DotIsa>,
) -> TractResult<Installed> {
    let mut installed = Installed::default();
    for id in model.eval_order()? {
        let node = model.node(id);
        if let (Some(dot), Some(einsum)) = (dot, node.op_as::<EinSum>()) {
            // tract declutters a 1x1 convolution into a matrix product.
            if let Some(op) = pointwise::quant_pointwise_of(model, node, einsum, dot)? {
                let (name, data) = (node.name.clone(), node.inputs[0]);
                replace(model, &name, data, id, op)?;
                installed.quant_pointwise += 1;
            }
            continue;
        }
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let name = node.name.clone();
        let data = node.inputs[0];
        if conv.q_params.is_some() {
            // The output range of a quantised layer already holds its clamp.
            if let Some(op) = quant::quant_depthwise_of(model, node, conv, isa)? {
                replace(model, &name, data, id, op)?;
                installed.quant_depthwise += 1;
            }
            continue;
        }
        let Some(mut op) = depthwise_of(model, node, conv, isa)? else {
            continue;
        };
        let (last, clamp, absorbed) = following_clamp(model, id)?;
        op.clamp = clamp;
        if absorbed > 0 {
            installed.fused_clamps += 1;
        }
        replace(model, &name, data, last, op)?;
        installed.depthwise += 1;
    }
    if installed.depthwise + installed.quant_depthwise + installed.quant_pointwise > 0 {
        *model = std::mem::take(model).into_compact()?;
    }
    Ok(installed)
}

/// Wires `op` on `data` in place of the nodes from the convolution to `last` (its
/// output is what readers of `last` now get).
fn replace(
    model: &mut TypedModel,
    name: &str,
    data: OutletId,
    last: usize,
    op: impl TypedOp,
) -> TractResult<()> {
    let mut patch = TypedModelPatch::new(format!("shelfwatch {name}"));
    let tap = patch.tap_model(model, data)?;
    let out = patch.wire_node(name, op, &[tap])?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), out)?;
    patch.apply(model)
}

/// The [`DepthwiseConv`] for a tract `Conv` node, if it is one we run.
fn depthwise_of(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    isa: Isa,
) -> TractResult<Option<DepthwiseConv>> {
    let spec = &conv.pool_spec;
    let channels = spec.input_channels;
    if conv.q_params.is_some()
        || conv.group < 2
        || conv.group != channels
        || spec.output_channels != channels
        || conv.kernel_fmt != KernelFormat::OIHW
        || !matches!(
            spec.data_format,
            DataFormat::NCHW | DataFormat::CHW | DataFormat::NHWC | DataFormat::HWC
        )
        || spec.rank() != 2
        || spec.dilations().iter().any(|&d| d != 1)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let input = model.outlet_fact(node.inputs[0])?;
    let Some(shape) = input.shape.as_concrete() else {
        return Ok(None);
    };
    if input.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let (batch, c, h, w, channels_last) = match (spec.data_format, shape) {
        (DataFormat::NCHW, &[n, c, h, w]) => (n, c, h, w, false),
        (DataFormat::CHW, &[c, h, w]) => (1, c, h, w, false),
        (DataFormat::NHWC, &[n, h, w, c]) => (n, c, h, w, true),
        (DataFormat::HWC, &[h, w, c]) => (1, c, h, w, true),
        _ => return Ok(None),
    };
    let kernel = model.outlet_fact(node.inputs[1])?.konst.clone();
    let bias = model.outlet_fact(node.inputs[2])?.konst.clone();
    let (Some(kernel), Some(bias)) = (kernel, bias) else {
        return Ok(None);
    };
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    if c != channels
        || kernel.datum_type() != f32::datum_type()
        || kernel.shape() != [c, 1, kh, kw]
        || bias.datum_type() != f32::datum_type()
        || !(bias.len() == c || bias.len() == 1)
    {
        return Ok(None);
    }
    let Some((geometry, output_shape)) = geometry_of(model, node, spec, batch, c, h, w)? else {
        return Ok(None);
    };
    let oihw = kernel.try_as_plain_ram()?;
    let oihw = oihw.as_slice::<f32>()?;
    let weights: Arc<[f32]> = if channels_last {
        // kh x kw x c: the channels of one tap side by side, as the data.
        let kk = kh * kw;
        (0..kk * c).map(|i| oihw[(i % c) * kk + i / c]).collect()
    } else {
        oihw.into()
    };
    let b = bias.try_as_plain_ram()?;
    let b = b.as_slice::<f32>()?;
    let bias: Arc<[f32]> = if b.len() == c {
        b.into()
    } else {
        vec![b[0]; c].into()
    };
    Ok(Some(DepthwiseConv {
        geometry,
        channels_last,
        batch,
        channels: c,
        weights,
        bias,
        clamp: Clamp::NONE,
        isa,
        output_shape,
    }))
}

/// The per-plane geometry of a 2-D convolution node over `batch x c x h x w` data, and
/// its concrete output shape; None when that shape is symbolic or does not match.
pub(super) fn geometry_of(
    model: &TypedModel,
    node: &TypedNode,
    spec: &tract_onnx::tract_core::ops::cnn::PoolSpec,
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
) -> TractResult<Option<(Geometry, TVec<usize>)>> {
    let padding = spec.computed_padding(&[h, w]);
    let output = model.outlet_fact(OutletId::new(node.id, 0))?;
    let Some(output_shape) = output.shape.as_concrete() else {
        return Ok(None);
    };
    let geometry = Geometry {
        h,
        w,
        oh: padding[0].convoluted,
        ow: padding[1].convoluted,
        kh: spec.kernel_shape[0],
        kw: spec.kernel_shape[1],
        sh: spec.stride(0),
        sw: spec.stride(1),
        pad_top: padding[0].pad_before,
        pad_left: padding[1].pad_before,
    };
    if geometry.oh == 0
        || geometry.ow == 0
        || output_shape.iter().product::<usize>() != batch * c * geometry.oh * geometry.ow
    {
        return Ok(None);
    }
    Ok(Some((geometry, output_shape.into())))
}

/// Follows the convolution's output through `Max(x, constant)` and `Min(x, constant)`
/// (how tract declutters ONNX's Relu and Clip), as long as each intermediate value has
/// no other reader and is not a model output. Returns the last node taken in, the
/// clamp, and how many nodes were taken in.
fn following_clamp(model: &TypedModel, conv: usize) -> TractResult<(usize, Clamp, usize)> {
    let outputs = model.output_outlets()?;
    let (mut last, mut clamp, mut absorbed) = (conv, Clamp::NONE, 0);
    loop {
        let outlet = OutletId::new(last, 0);
        let succs = &model.node(last).outputs[0].successors;
        if succs.len() != 1 || outputs.contains(&outlet) {
            break;
        }
        let next = model.node(succs[0].node);
        let Some(bin) = next.op_as::<TypedBinOp>() else {
            break;
        };
        let other = if next.inputs[0] == outlet {
            next.inputs[1]
        } else {
            next.inputs[0]
        };
        let Some(k) = model.outlet_fact(other)?.konst.clone() else {
            break;
        };
        if k.datum_type() != f32::datum_type() || k.len() != 1 || next.inputs.len() != 2 {
            break;
        }
        if model.outlet_fact(OutletId::new(next.id, 0))?.shape != model.outlet_fact(outlet)?.shape {
            break;
        }
        let v = k.try_as_plain_ram()?.as_slice::<f32>()?[0];
        let mut taken = clamp;
        match bin.0.name() {
            "Max" => taken.lo = taken.lo.max(v),
            "Min" => taken.hi = taken.hi.min(v),
            _ => break,
        }
        // min(max(x, lo), hi) is the chain's value only while lo <= hi (and neither is
        // NaN): a bound past the other one stays a node of its own.
        if taken.lo.is_nan() || taken.hi.is_nan() || taken.lo > taken.hi {
            break;
        }
        clamp = taken;
        last = next.id;
        absorbed += 1;
    }
    Ok((last, clamp, absorbed))
}

#[cfg(test)]
mod tests {
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;

    use super::depthwise::tests::Lcg;
    use super::*;

    /// A random tensor from the kernel tests' generator.
    fn random(rng: &mut Lcg, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| rng.next() * scale).collect();
        tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .unwrap()
            .into_tensor()
    }

    /// input -> depthwise Conv (tract's op) -> Max(0) -> Min(6) as ONNX's Clip declutters,
    /// or without the clamp.
    #[allow(clippy::too_many_arguments)]
    fn model(
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        padding: PaddingSpec,
        relu6: bool,
        channels_last: bool,
        rng: &mut Lcg,
    ) -> TypedModel {
        let mut m = TypedModel::default();
        let (shape, format): (&[usize], _) = if channels_last {
            (&[h, w, c], DataFormat::HWC)
        } else {
            (&[1, c, h, w], DataFormat::NCHW)
        };
        let x = m.add_source("x", f32::fact(shape)).unwrap();
        let kernel = m.add_const("k", random(rng, &[c, 1, k, k], 1.0)).unwrap();
        let bias = m.add_const("b", random(rng, &[c], 1.0)).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: format,
                kernel_shape: tvec![k, k],
                padding,
                dilations: None,
                strides: Some(tvec![s, s]),
                input_channels: c,
                output_channels: c,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: c,
            q_params: None,
        };
        let mut y = m.wire_node("conv", conv, &[x, kernel, bias]).unwrap()[0];
        if relu6 {
            let scalar = |v: f32| {
                let t = tensor0(v);
                if channels_last {
                    t.broadcast_into_rank(3)
                } else {
                    t.broadcast_into_rank(4)
                }
                .unwrap()
            };
            let zero = m.add_const("zero", scalar(0.0)).unwrap();
            let six = m.add_const("six", scalar(6.0)).unwrap();
            y = m.wire_node("relu6.min", math::max(), &[y, zero]).unwrap()[0];
            y = m.wire_node("relu6.max", math::min(), &[y, six]).unwrap()[0];
        }
        m.select_output_outlets(&[y]).unwrap();
        m
    }

    fn run(m: TypedModel, input: &Tensor) -> Tensor {
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        plan.run(tvec!(input.clone().into_tvalue()))
            .unwrap()
            .remove(0)
            .into_tensor()
    }

    #[test]
    fn the_installed_kernels_equal_tracts_own_depthwise_op_on_random_shapes() {
        let mut rng = Lcg(11);
        let isas = [Isa::Generic, Isa::detect()];
        let cases = [
            (3, 1, PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1])),
            (3, 2, PaddingSpec::Explicit(tvec![0, 0], tvec![1, 1])),
            (3, 2, PaddingSpec::SameUpper),
            (5, 1, PaddingSpec::Explicit(tvec![2, 2], tvec![2, 2])),
            (5, 2, PaddingSpec::Explicit(tvec![1, 1], tvec![2, 2])),
            (5, 2, PaddingSpec::Valid),
        ];
        for (i, (k, s, padding)) in cases.into_iter().enumerate() {
            let (c, h, w) = (3 + i * 5, 7 + i * 3, 9 + i * 7);
            for (relu6, channels_last) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let m = model(
                    c,
                    h,
                    w,
                    k,
                    s,
                    padding.clone(),
                    relu6,
                    channels_last,
                    &mut rng,
                );
                let shape: &[usize] = if channels_last {
                    &[h, w, c]
                } else {
                    &[1, c, h, w]
                };
                let input = random(&mut rng, shape, 4.0);
                let want = run(m.clone(), &input);
                for isa in isas {
                    let mut ours = m.clone();
                    let installed = install(&mut ours, isa).unwrap();
                    assert_eq!(installed.depthwise, 1, "case {i}");
                    assert_eq!(installed.fused_clamps, relu6 as usize, "case {i}");
                    assert_eq!(ours.nodes().iter().filter(|n| n.op_is::<Conv>()).count(), 0);
                    assert_eq!(
                        ours.nodes()
                            .iter()
                            .filter(|n| n.op_is::<TypedBinOp>())
                            .count(),
                        0,
                        "the clamp was fused"
                    );
                    let got = run(ours, &input);
                    assert_eq!(got.shape(), want.shape());
                    let (g, w) = (
                        got.try_as_plain_ram().unwrap(),
                        want.try_as_plain_ram().unwrap(),
                    );
                    for (a, b) in g
                        .as_slice::<f32>()
                        .unwrap()
                        .iter()
                        .zip(w.as_slice::<f32>().unwrap())
                    {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "case {i} {isa:?} relu6 {relu6} channels last {channels_last}: {a} vs tract's {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_clamp_whose_input_is_read_elsewhere_stays_a_node_of_its_own() {
        let mut rng = Lcg(3);
        let mut m = model(
            4,
            6,
            6,
            3,
            1,
            PaddingSpec::SameUpper,
            false,
            false,
            &mut rng,
        );
        // The convolution's raw output is also a model output: a fused clamp would change it.
        let conv = m.output_outlets().unwrap()[0];
        let zero = m.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        let relu = m.wire_node("relu", math::max(), &[conv, zero]).unwrap()[0];
        m.select_output_outlets(&[conv, relu]).unwrap();
        let installed = install(&mut m, Isa::detect()).unwrap();
        assert_eq!((installed.depthwise, installed.fused_clamps), (1, 0));
        assert_eq!(
            m.nodes().iter().filter(|n| n.op_is::<TypedBinOp>()).count(),
            1
        );
    }
}
