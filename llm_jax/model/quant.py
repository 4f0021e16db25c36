"""A quantized frozen base: the projections stored as int8 or 4-bit NormalFloat codes, dequantized inside each
matmul, with LoRA adapters trained in the compute dtype on top (QLoRA, Dettmers et al. 2023).

Config (`config.model`, checked by `ModelConfig.validate` through `check`)
    base_quant        none | int8 | nf4: how the seven projections (wq, wk, wv, wo, w_gate, w_up, w_down) of
                      every layer are stored; the embedding, LM head and norms stay in `param_dtype`
    quant_block       weights per absmax scale (QLoRA: 64), taken along the projection's input
    quant_double      quantize the scales too (QLoRA's double quantization): int8 codes of (scale − mean)
    quant_scale_block scales per second-level f32 scale (QLoRA: 256)

The numbers (Qwix, Google's JAX quantization library, does the numerics: `qwix.quantize` / `qwix.dequantize`)
    A weight W (*in → *out) is cut into blocks of `quant_block` consecutive input elements for each output
    element (the blocks of bitsandbytes' row-major (out, in) weights). With s = absmax(block):
        int8   code = round(w · 127.5 / s), clipped to [−128, 127];   w ≈ code · s / 127.5
        nf4    code = the nearest of the 16 NF4 levels q_i (the normal distribution's quantiles, QLoRA's
               Appendix E; q_0 = −1, q_7 = 0, q_15 = 1) to w / s;      w ≈ q_code · s
    Double quantization stores each scale as int8 again: c = round((s − mean(s)) · 127.5 / s₂) in blocks of
    `quant_scale_block` scales (along the scales' own axes, innermost first, as far as the axis sizes allow),
    s₂ in f32 and the mean per tensor: 8 + 32/256 bits per block of 64 weights instead of 32, so NF4 costs
    4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight, as in the paper.

Storage (the param tree; Orbax cannot write 4-bit arrays, so NF4 codes are packed two to a byte)
    `<W>/codes`         int8 (int8), or uint8 holding two NF4 codes (nf4: low nibble the even input index),
                        packed along W's innermost input axis
    `<W>/scales`        f32 (per block), or int8 with double quantization
    `<W>/scales_scale`  f32 per block of scales, and `<W>/scales_mean` f32 (double quantization only)
    Each part carries W's logical axes, so it is sharded like W; an axis whose shrunken size the mesh does not
    divide (a scale axis of 2 blocks over 4 FSDP shards) is left whole on that axis (`sharding.divisible_axes`).

The matmul (`matmul`)
    x·deq(W) with a custom gradient: the backward dequantizes W again for dx = g·deq(W)ᵀ instead of saving
    it, so no full-precision copy of a layer's weight outlives its use (under scan, autodiff would otherwise
    keep every layer's dequantized weight as a residual). The codes get no gradient: they are frozen.

Quantizing happens once: a run that starts from a full-precision run (`train.init_from`, or `import-hf`)
quantizes its weights (`quantize_tree`); a run that starts from a quantized one carries its codes bit for bit
(train/checkpoint.py `start_params`); quantizing an already quantized base again is refused.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import qwix

SCHEMES = ("none", "int8", "nf4")
QUANTIZED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the projections a quantized base stores
_QTYPE = {"int8": jnp.int8, "nf4": "nf4"}
PARTS = ("codes", "scales", "scales_scale", "scales_mean")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one weight of `shape` (*in, *out; `n_in` input dims) is stored."""
    scheme: str
    shape: tuple
    n_in: int
    tiles: tuple              # weights per scale along each axis (1 on the output axes)
    double: bool
    scale_tiles: tuple = ()   # scales per second-level scale along each axis (double quantization)
    dtype: str = "float32"    # of the dequantized weight (the model's param_dtype)

    @property
    def packed(self) -> bool:
        return self.scheme == "nf4"

    @property
    def pack_axis(self) -> int:
        return self.n_in - 1

    @property
    def codes_shape(self) -> tuple:
        shape = list(self.shape)
        if self.packed:
            shape[self.pack_axis] //= 2
        return tuple(shape)

    @property
    def scales_shape(self) -> tuple:
        return tuple(s // t for s, t in zip(self.shape, self.tiles))

    @property
    def scales_scale_shape(self) -> tuple:
        return tuple(s // t for s, t in zip(self.scales_shape, self.scale_tiles))


def projection_shapes(cfg) -> dict[str, tuple[tuple, int]]:
    """Each quantized projection's per-layer shape and number of input dims, as the model declares them."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return dict(wq=((d, h, hd), 1), wk=((d, k, hd), 1), wv=((d, k, hd), 1), wo=((h, hd, d), 2),
                w_gate=((d, f), 1), w_up=((d, f), 1), w_down=((f, d), 1))


def settings(cfg) -> tuple | None:
    """What makes two quantized bases the same format; None for a full-precision base."""
    if getattr(cfg, "base_quant", "none") == "none":
        return None
    return (cfg.base_quant, cfg.quant_block, cfg.quant_double, cfg.quant_scale_block if cfg.quant_double else 0)


def describe(cfg) -> str:
    q = settings(cfg)
    if q is None:
        return "full precision"
    return f"{q[0]}, blocks of {q[1]}" + (f", double-quantized scales (blocks of {q[3]})" if q[2] else "")


def _input_tiles(shape: tuple, n_in: int, block: int, name: str) -> tuple:
    """Tiles of `block` consecutive input elements: the innermost input axis first, then outward."""
    tiles, left = [1] * len(shape), block
    for axis in reversed(range(n_in)):
        size = shape[axis]
        if left <= size:
            if size % left:
                break
            tiles[axis], left = left, 1
            break
        if left % size:
            break
        tiles[axis], left = size, left // size
    if left != 1 or math.prod(tiles) != block:
        raise ValueError(f"quant_block={block} does not divide the input of {name} (shape {shape}, input "
                         f"dims {shape[:n_in]}): choose a block that divides {math.prod(shape[:n_in])} along the "
                         "innermost input dims")
    return tuple(tiles)


def _scale_tiles(shape: tuple, block: int) -> tuple:
    """Up to `block` scales per second-level scale, innermost axis first: each axis gives gcd(size, what is
    left) and the next axis is reached only when this one is taken whole."""
    tiles, left = [1] * len(shape), block
    for axis in reversed(range(len(shape))):
        take = math.gcd(shape[axis], left)
        tiles[axis], left = take, left // take
        if take != shape[axis] or left == 1:
            break
    return tuple(tiles)


def layout(cfg, name: str, shape: tuple, n_in: int) -> Layout:
    """The storage of projection `name` (per-layer `shape`) under `cfg`'s base_quant; ValueError naming the
    tensor where the block does not fit it."""
    tiles = _input_tiles(tuple(shape), n_in, cfg.quant_block, name)
    if cfg.base_quant == "nf4" and shape[n_in - 1] % 2:
        raise ValueError(f"base_quant=nf4 packs two codes per byte along the innermost input dim of {name}, "
                         f"whose size {shape[n_in - 1]} is odd")
    scales_shape = tuple(s // t for s, t in zip(shape, tiles))
    scale_tiles = _scale_tiles(scales_shape, cfg.quant_scale_block) if cfg.quant_double else ()
    return Layout(cfg.base_quant, tuple(shape), n_in, tiles, bool(cfg.quant_double), scale_tiles,
                  str(jnp.dtype(cfg.param_dtype)))


def check(cfg) -> None:
    """Every quantized projection of `cfg` has a layout (ValueError naming the first that has none)."""
    if cfg.base_quant not in SCHEMES:
        raise ValueError(f"base_quant={cfg.base_quant!r} is not one of {', '.join(SCHEMES)}")
    if cfg.base_quant == "none":
        return
    if cfg.quant_block < 2:
        raise ValueError(f"quant_block must be >= 2, got {cfg.quant_block}")
    if cfg.quant_double and cfg.quant_scale_block < 2:
        raise ValueError(f"quant_scale_block must be >= 2, got {cfg.quant_scale_block}")
    for name, (shape, n_in) in projection_shapes(cfg).items():
        layout(cfg, name, shape, n_in)


# ------------------------------------------------------------------------------------------------ numerics

def _pack(codes):
    """uint8 NF4 codes (0..15) → two per byte along axis 0 of `codes` moved in front (see `quantize`)."""
    return (codes[0::2] | (codes[1::2] << 4)).astype(jnp.uint8)


def _unpack(packed):
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=1).reshape(-1, *packed.shape[1:])


def _along(fn, x, axis: int):
    """fn applied with `axis` moved to the front, and moved back."""
    return jnp.moveaxis(fn(jnp.moveaxis(x, axis, 0)), 0, axis)


def _qwix_quantize(x, qtype, tiles: tuple):
    """One scale per tile (`tiles[axis]` elements along each axis: 1 is a scale per element of that axis)."""
    return qwix.quantize(x, qtype, channelwise_axes=[axis for axis, t in enumerate(tiles) if t == 1],
                         tiled_axes={axis: t for axis, t in enumerate(tiles) if t > 1})


def quantize(w, lay: Layout) -> dict:
    """The stored parts of one weight (per-layer shape `lay.shape`)."""
    q = _qwix_quantize(w.astype(jnp.float32), _QTYPE[lay.scheme], lay.tiles)
    codes = q.qvalue
    if lay.packed:
        codes = _along(_pack, codes.astype(jnp.uint8), lay.pack_axis)
    parts = dict(codes=codes)
    scales = q.scale.astype(jnp.float32)
    if not lay.double:
        return dict(parts, scales=scales)
    mean = jnp.mean(scales)
    qs = _qwix_quantize(scales - mean, jnp.int8, lay.scale_tiles)
    return dict(parts, scales=qs.qvalue, scales_scale=qs.scale.astype(jnp.float32), scales_mean=mean)


def scales_of(parts: Mapping, lay: Layout):
    """The f32 per-block scales (decoding the double quantization)."""
    if not lay.double:
        return parts["scales"]
    second = qwix.dequantize(qwix.QArray(qvalue=parts["scales"], scale=parts["scales_scale"], qtype=jnp.int8))
    return second + parts["scales_mean"]


def dequantize(parts: Mapping, lay: Layout):
    """The weight (`lay.shape`, `lay.dtype`) the parts encode."""
    codes = parts["codes"]
    if lay.packed:
        codes = _along(_unpack, codes, lay.pack_axis)
    w = qwix.dequantize(qwix.QArray(qvalue=codes, scale=scales_of(parts, lay), qtype=_QTYPE[lay.scheme]))
    return w.astype(lay.dtype)


def _contract(x, w, n_in: int):
    """x (*lead, *in) · w (*in, *out) as one 2-D matmul (transformer.token_matmul's shape)."""
    k = math.prod(w.shape[:n_in])
    lead = x.shape[:x.ndim - n_in]
    return jnp.dot(x.reshape(-1, k), w.reshape(k, -1)).reshape(*lead, *w.shape[n_in:])


def matmul(x, parts: Mapping, lay: Layout):
    """x (B, T, *in) · deq(W) → (B, T, *out) in x's dtype; gradient for x only (see the module docstring)."""
    return _matmul_static(lay)(x, parts)


_MATMULS: dict = {}


def _matmul_static(lay: Layout):
    """The custom-gradient matmul for one (hashable) layout."""
    if lay in _MATMULS:
        return _MATMULS[lay]

    @jax.custom_vjp
    def mm(x, parts):
        return _contract(x, dequantize(parts, lay).astype(x.dtype), lay.n_in)

    def fwd(x, parts):
        return mm(x, parts), parts

    def bwd(parts, g):
        w = dequantize(parts, lay).astype(g.dtype)
        n_out = len(lay.shape) - lay.n_in
        k, n = math.prod(lay.shape[:lay.n_in]), math.prod(lay.shape[lay.n_in:])
        lead = g.shape[:g.ndim - n_out]
        dx = jnp.dot(g.reshape(-1, n), w.reshape(k, n).T).reshape(*lead, *lay.shape[:lay.n_in])
        return dx, None

    mm.defvjp(fwd, bwd)
    _MATMULS[lay] = mm
    return mm


# ------------------------------------------------------------------------------------------------ trees

def is_quantized(node) -> bool:
    """Whether a param-tree node is a quantized weight's parts."""
    return isinstance(node, Mapping) and "codes" in node and set(node) <= set(PARTS)


def logical_size(node) -> int:
    """The number of weights a param leaf or quantized node stands for."""
    if is_quantized(node):
        codes = node["codes"]
        return math.prod(codes.shape) * (2 if jnp.dtype(codes.dtype) == jnp.uint8 else 1)
    return math.prod(node.shape)


def _walk(tree, fn, names=()):
    """`tree` with fn(names, node) at each quantized projection's node (a plain weight or its parts)."""
    if not isinstance(tree, Mapping) or is_quantized(tree):
        return fn(names, tree) if names and names[-1] in QUANTIZED else tree
    return {key: _walk(value, fn, names + (str(key),)) for key, value in tree.items()}


def _per_layer(fn, x, n_dims: int):
    """fn over x's trailing `n_dims` dims, one leading slice at a time (lax.map: one layer's temporaries)."""
    lead = x.shape[:x.ndim - n_dims]
    if not lead:
        return fn(x)
    flat = x.reshape(-1, *x.shape[len(lead):])
    out = jax.lax.map(fn, flat)
    return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), out)


def quantize_tree(params, cfg):
    """`params` with every full-precision quantized projection quantized under `cfg` (a scanned layer stack
    one layer at a time); parts already quantized are left as they are."""
    shapes = projection_shapes(cfg)

    def convert(names, node):
        if is_quantized(node):
            return node
        shape, n_in = shapes[names[-1]]
        lay = layout(cfg, names[-1], shape, n_in)
        return _per_layer(lambda w: quantize(w, lay), node, len(shape))
    return _walk(params, convert)


def dequantize_tree(params, cfg):
    """`params` with every quantized projection dequantized (the full-precision model's params)."""
    shapes = projection_shapes(cfg)

    def convert(names, node):
        if not is_quantized(node):
            return node
        shape, n_in = shapes[names[-1]]
        lay = layout(cfg, names[-1], shape, n_in)
        lead = node["codes"].ndim - len(shape)
        fn = lambda parts: dequantize(parts, lay)  # noqa: E731
        for _ in range(lead):
            fn = jax.vmap(fn)
        return fn(node)
    return _walk(params, convert)


def plain_abstract(abstract_params, cfg):
    """The full-precision weights' abstract shapes (with the codes' shardings) for quantized `abstract_params`:
    what a full-precision run's checkpoint is restored into before `quantize_tree`."""
    shapes = projection_shapes(cfg)

    def convert(names, node):
        if not is_quantized(node):
            return node
        codes = node["codes"]
        shape, _ = shapes[names[-1]]
        lead = tuple(codes.shape[:codes.ndim - len(shape)])
        return jax.ShapeDtypeStruct(lead + tuple(shape), jnp.dtype(cfg.param_dtype),
                                    sharding=getattr(codes, "sharding", None))
    return _walk(abstract_params, convert)
