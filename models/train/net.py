"""The trainable network in JAX: EfficientNet-Lite0's later blocks and the counting head.

The blocks are not re-typed by hand: `Blocks` reads the sub-graph of
models/efficientnet_lite0.onnx between two tensors (Conv with folded batch norm, Clip =
ReLU6, Add) and runs it with the graph's own attributes, so the TF-SAME explicit pads of
the stride-2 depthwise convolutions ([1, 1, 2, 2] for block11's 5x5) are exactly those
the exported ONNX uses. Trained weights go back into the same nodes at export
(export.py), so the fine-tuned blocks replace the original ones in the graph.

Head: per scale a 1x1 projection to HEAD_CH channels of the normalised features
(stride 8: block4/add, frozen; stride 16: block10/add, frozen; stride 32: the fine-tuned
block15/project/conv), nearest-neighbour upsampling to stride 8, sum + bias, ReLU, a 3x3
convolution HEAD_CH -> HEAD_CH + ReLU (lets neighbouring cells talk before deciding,
which touching products need), and a 3x3 convolution to 5 channels: centre heat logit,
dx, dy, log w, log h (cells). With a stride-4 heat map (SHELF_HEAT_STRIDE=4) the trunk
is projected to HEAD4_CH channels and upsampled 2x, plus a 1x1 projection of the
normalised stride-4 features (block2/add, frozen), ReLU, a 3x3 convolution HEAD4_CH ->
HEAD4_CH + ReLU, before that last convolution.
"""
import numpy as np

import common



class Blocks:
    """The ONNX sub-graph from tensor `start` to tensor `end`, as a JAX function."""

    def __init__(self, model, start, end):
        from onnx import numpy_helper

        g = model.graph
        producers = {o: n for n in g.node for o in n.output}
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        seen, stack = set(), [end]
        # depth-first from the end back to `start`, then in graph order
        while stack:
            t = stack.pop()
            if t == start or t in seen or t in inits:
                continue
            seen.add(t)
            n = producers[t]
            stack.extend(n.input)
        self.nodes = []
        self.params = {}
        self.consts = {}
        for n in g.node:
            if n.output[0] not in seen:
                continue
            attrs = {a.name: _attr(a) for a in n.attribute}
            if n.op_type == "Conv":
                w, b = n.input[1], n.input[2]
                self.params[w] = inits[w].astype(np.float32)
                self.params[b] = inits[b].astype(np.float32)
                p = attrs.get("pads", [0, 0, 0, 0])
                spec = dict(strides=tuple(attrs.get("strides", [1, 1])),
                            padding=((p[0], p[2]), (p[1], p[3])),
                            group=attrs.get("group", 1))
            elif n.op_type == "Clip":
                lo, hi = float(inits[n.input[1]].reshape(())), float(inits[n.input[2]].reshape(()))
                spec = dict(lo=lo, hi=hi)
            elif n.op_type == "Add":
                spec = {}
            else:
                raise SystemExit(f"net.Blocks: unsupported op {n.op_type} ({n.name})")
            self.nodes.append((n.op_type, list(n.input), n.output[0], spec))
        self.start, self.end = start, end

    def __call__(self, params, x):
        """x: [B, C, H, W] (the `start` tensor) -> the `end` tensor."""
        import jax

        env = {self.start: x}
        for op, ins, out, spec in self.nodes:
            if op == "Conv":
                y = conv(env[ins[0]], params[ins[1]], spec["strides"], spec["padding"],
                         spec["group"])
                env[out] = y + params[ins[2]][None, :, None, None]
            elif op == "Clip":
                env[out] = jax.numpy.clip(env[ins[0]], spec["lo"], spec["hi"])
            else:
                env[out] = env[ins[0]] + env[ins[1]]
        return env[self.end]


def conv(x, w, strides=(1, 1), padding=((0, 0), (0, 0)), group=1):
    """NCHW convolution with ONNX (OIHW) weights, written the way XLA's CPU backend runs
    fastest here (measured on this 2-core machine: XLA's own grouped convolution, and
    NHWC layouts, made the backward pass of the depthwise convolutions 2-4x slower): a
    1x1 convolution is one matrix product over channels; a k x k one (dense or
    depthwise) is a sum over the k*k taps of shifted, strided slices of the padded input,
    times the tap's matrix (dense) or per-channel weight (depthwise)."""
    import jax.numpy as jnp

    o, ci, kh, kw = w.shape
    sh, sw = strides
    if kh == kw == 1 and group == 1 and strides == (1, 1) and padding == ((0, 0), (0, 0)):
        return jnp.einsum("oc,bchw->bohw", w[:, :, 0, 0], x)
    depthwise = group == x.shape[1] == o and ci == 1
    if group != 1 and not depthwise:
        raise SystemExit(f"net.conv: grouped convolution with group {group}")
    xp = jnp.pad(x, ((0, 0), (0, 0)) + tuple(padding))
    ho = (xp.shape[2] - kh) // sh + 1
    wo = (xp.shape[3] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            if depthwise:
                t = win * w[None, :, 0, i, j, None, None]
            else:
                t = jnp.einsum("oc,bchw->bohw", w[:, :, i, j], win)
            out = t if out is None else out + t
    return out


def _attr(a):
    from onnx import helper

    return helper.get_attribute_value(a)


def init_head(rng, *channels, ch=common.HEAD_CH, ch4=common.HEAD4_CH):
    """He-style initialisation; the heat bias starts at -2.19 (prior 0.1, as CenterNet)
    and the log-size biases at typical sizes so early box gradients are sane. channels:
    of each tap of common.TAPS (a stride-4 tap first adds the stride-4 part)."""
    def he(shape, fan_in):
        return rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)

    c8, c16, c32 = channels[-3:]
    P = {"p8": he((ch, c8), 3 * c8) , "p16": he((ch, c16), 3 * c16),
         "p32": he((ch, c32), 3 * c32), "pb": np.zeros(ch, np.float32),
         "m": he((ch, ch, 3, 3), 9 * ch), "mb": np.zeros(ch, np.float32)}
    last = ch
    if len(channels) == 4:
        last = ch4
        P.update({"q": he((ch4, ch), 2 * ch), "p4": he((ch4, channels[0]), 2 * channels[0]),
                  "qb": np.zeros(ch4, np.float32),
                  "m4": he((ch4, ch4, 3, 3), 9 * ch4), "m4b": np.zeros(ch4, np.float32)})
    up = float(np.log(8.0 / common.STRIDE))
    P["k"] = rng.normal(0, 0.01, (5, last, 3, 3)).astype(np.float32)
    P["kb"] = np.array([-2.19, 0.0, 0.0, 1.5 + up, 1.7 + up], np.float32)
    return P


# The head's kernels (weight decay applies to these, not to biases).
HEAD_KERNELS = ("p8", "p16", "p32", "m", "q", "p4", "m4", "k")


def head_apply(P, *feats):
    """Normalised features (NCHW) of each tap of common.TAPS -> [B, 5, H/s, W/s] (heat
    logit, dx, dy, log w, log h; s = common.STRIDE)."""
    import jax
    import jax.numpy as jnp

    def proj(w, f):
        return jnp.einsum("oc,bchw->bohw", w, f)

    def up(x, f):
        return jnp.repeat(jnp.repeat(x, f, axis=2), f, axis=3)

    f8, f16, f32 = feats[-3:]
    s = proj(P["p8"], f8) + up(proj(P["p16"], f16), 2) + up(proj(P["p32"], f32), 4)
    a = jax.nn.relu(s + P["pb"][None, :, None, None])
    pad = ((1, 1), (1, 1))
    a = jax.nn.relu(conv(a, P["m"], padding=pad) + P["mb"][None, :, None, None])
    if len(feats) == 4:
        a = up(proj(P["q"], a), 2) + proj(P["p4"], feats[0]) + P["qb"][None, :, None, None]
        a = jax.nn.relu(a)
        a = jax.nn.relu(conv(a, P["m4"], padding=pad) + P["m4b"][None, :, None, None])
    return conv(a, P["k"], padding=pad) + P["kb"][None, :, None, None]


def normalise(norm, *feats):
    """Per-channel feature normalisation (constants from the training features, folded
    into the projections at export); one (mean, std) per tap."""
    return tuple((f - m) / s for f, (m, s) in zip(feats, norm))


def forward(params, blocks, norm, *frozen):
    """Cached frozen features (raw, float32, NCHW; every tap of common.TAPS but the last)
    -> [B, 5, H/s, W/s], running the fine-tuned blocks on the last of them (block10/add).
    norm: one (mean, std) shaped [1,C,1,1] per tap."""
    f32 = blocks(params["blocks"], frozen[-1])
    return head_apply(params["head"], *normalise(norm, *frozen, f32))
