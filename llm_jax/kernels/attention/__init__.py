"""Attention: one dispatch point for the whole codebase, with the pure-jnp reference as the definition.

Layout: q (B, T, H, D), k and v (B, S, K, D) with H a multiple of K (grouped-query attention: each K/V head
serves H/K query heads, never materialised as H heads). `segment_ids` (B, T) marks packed documents; a
query attends only to keys of its own segment. `window` W > 0 is sliding-window attention (key s visible to query
t when t − W < s ≤ t; `reference.py`), served by every path: the flash kernels skip key blocks wholly outside
the window as they skip those above the diagonal.

Implementations (`model.attention_impl`):
- `reference`: `reference.py`, plain softmax(q·kᵀ/√D)·v; the definition, materialises (B, H, T, S).
- `xla`: `xla.py`, the same maths with a FlashAttention-style recomputing backward; best on CPU.
- `pallas`: `flash.py`, our Pallas kernels (Mosaic on TPU, Triton on GPU, interpret mode elsewhere).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA only, bf16/fp16 only.
- `auto`: pallas on TPU, cudnn on NVIDIA for bf16/fp16 (xla for f32), xla elsewhere.

Given a mesh, the kernel paths (pallas, cudnn) run under `shard_map`: batch split over the axes that
`batch` maps to, query and K/V heads over the axes `act_heads` maps to (tensor). The sequence is gathered, so a
`sequence`-sharded mesh gives every device the whole sequence of its heads (no ring attention yet).
The XLA paths need no shard_map: the compiler partitions them from the activations' shardings.

A soft prompt shared by a row's packed segments (prompt tuning) is the segment `PROMPT_SEGMENT`, visible to
every non-padding query, with windows measured in `positions_bt` (`reference.py`). The reference and xla paths
serve it; the pallas and cudnn kernels mask by segment equality and row index, so a call that gives
`positions_bt` to them is refused (the model runs such calls on the xla path: model/transformer.py).

Decode (`decode_attention`): a few new queries against a head-major KV cache with per-row lengths.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llm_jax import sharding
from llm_jax.kernels.attention.blocks import BlockSizes
from llm_jax.kernels.attention.decode import pallas_decode_attention
from llm_jax.kernels.attention.flash import RESIDUAL_NAMES as ATTENTION_RESIDUAL_NAMES
from llm_jax.kernels.attention.flash import flash_attention
from llm_jax.kernels.attention.reference import (MASK_VALUE, PROMPT_SEGMENT, attention_mask, check_window,
                                                 reference_attention, reference_decode_attention)
from llm_jax.kernels.attention.xla import xla_attention

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas", "cudnn")
SHARED_PREFIX_IMPLEMENTATIONS = ("reference", "xla")  # those that serve PROMPT_SEGMENT and positions_bt
DECODE_IMPLEMENTATIONS = ("auto", "reference", "pallas")
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)

__all__ = ["ATTENTION_RESIDUAL_NAMES", "IMPLEMENTATIONS", "DECODE_IMPLEMENTATIONS", "BlockSizes", "MASK_VALUE",
           "PROMPT_SEGMENT", "SHARED_PREFIX_IMPLEMENTATIONS", "attention",
           "attention_mask", "check_window", "cudnn_attention", "decode_attention", "flash_attention", "platform_of",
           "reference_attention", "reference_decode_attention", "resolve_impl", "xla_attention"]


def platform_of(mesh=None) -> str:
    """'tpu', 'gpu' or 'cpu': the platform of the mesh's devices, else of the default backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve_impl(impl: str, platform: str, dtype) -> str:
    """The implementation `impl` names on `platform` (resolving `auto`)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "pallas"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in _HALF_DTYPES:
        return "cudnn"
    return "xla"


def cudnn_attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal=True, window: int = 0):
    """cuDNN's fused attention via `jax.nn.dot_product_attention`; packed documents become a mask."""
    if jnp.dtype(q_bthd.dtype) not in _HALF_DTYPES:
        raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got {q_bthd.dtype}; "
                         "use attention_impl='xla' or 'pallas' for float32")
    mask = None
    if segment_ids_bt is not None:
        mask = (segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :])
    check_window(window, causal)
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask, is_causal=causal,
                                        local_window_size=(window - 1, 0) if window else None,
                                        implementation="cudnn")


def _parts(mesh, axes) -> int:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes if a is not None]))


def _split_axes(mesh, rules, batch: int, heads: int, kv_heads: int):
    """Mesh axes for the batch and the heads under shard_map.

    A dimension its mesh axes do not divide (the one-row batch of parameter init, 2 K/V heads on 4 tensor
    devices) is replicated instead of split: correct, only less parallel.
    """
    batch_axes = sharding.logical_to_spec(("batch",), rules)[0]
    head_axes = sharding.logical_to_spec(("act_heads",), rules)[0]
    if batch % _parts(mesh, batch_axes):
        batch_axes = None
    if heads % _parts(mesh, head_axes) or kv_heads % _parts(mesh, head_axes):
        head_axes = None
    return batch_axes, head_axes


def _shard_mapped(fn, q_bthd, k_bskd, v_bskd, segment_ids_bt, mesh, rules):
    """Runs fn(q, k, v, segment_ids) on each device's batch rows and heads."""
    batch_axes, head_axes = _split_axes(mesh, rules, q_bthd.shape[0], q_bthd.shape[2], k_bskd.shape[2])
    q_spec = P(batch_axes, None, head_axes, None)
    if segment_ids_bt is None:
        mapped = lambda q, k, v: fn(q, k, v, None)  # noqa: E731
        in_specs, args = (q_spec, q_spec, q_spec), (q_bthd, k_bskd, v_bskd)
    else:
        mapped, in_specs = fn, (q_spec, q_spec, q_spec, P(batch_axes, None))
        args = (q_bthd, k_bskd, v_bskd, segment_ids_bt)
    return jax.shard_map(mapped, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)


def attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal=True, window: int = 0, impl="auto", mesh=None,
              rules=(), blocks: BlockSizes | None = None, positions_bt=None):
    """Dispatches to the implementation named by `impl`; see the module docstring. `positions_bt` (a soft prompt
    shared by packed segments) is served by SHARED_PREFIX_IMPLEMENTATIONS only."""
    impl = resolve_impl(impl, platform_of(mesh), q_bthd.dtype)
    if impl == "reference":
        return reference_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt=segment_ids_bt, causal=causal,
                                   window=window, positions_bt=positions_bt)
    if impl == "xla":
        return xla_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt=segment_ids_bt, causal=causal, window=window,
                             positions_bt=positions_bt)
    if positions_bt is not None:
        raise ValueError(f"attention impl {impl!r} masks by segment equality and row index: a soft prompt shared by "
                         f"packed segments (positions_bt given) needs one of {SHARED_PREFIX_IMPLEMENTATIONS}")
    if impl == "pallas":
        def fn(q, k, v, seg):
            return flash_attention(q, k, v, segment_ids_bt=seg, causal=causal, window=window, blocks=blocks)
    else:
        def fn(q, k, v, seg):
            return cudnn_attention(q, k, v, segment_ids_bt=seg, causal=causal, window=window)
    if mesh is None or mesh.size == 1:
        return fn(q_bthd, k_bskd, v_bskd, segment_ids_bt)
    return _shard_mapped(fn, q_bthd, k_bskd, v_bskd, segment_ids_bt, mesh, rules)


def decode_attention(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b, *, window: int = 0, impl="auto",
                     block_kv: int | None = None, mesh=None, rules=()):
    """New queries against a KV cache (see `decode.py`); `auto` is pallas on TPU and GPU, else reference.

    With a mesh, the kernel runs under shard_map: rows over the batch axes, heads over the tensor axes.
    """
    if impl not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"decode attention impl {impl!r} is not one of {DECODE_IMPLEMENTATIONS}")
    if impl == "auto":
        impl = "pallas" if platform_of(mesh) in ("tpu", "gpu", "cuda") else "reference"
    if impl == "reference":
        return reference_decode_attention(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b, window=window)

    def fn(q, k, v, lengths):
        return pallas_decode_attention(q, k, v, lengths, window=window, block_kv=block_kv)
    if mesh is None or mesh.size == 1:
        return fn(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b)
    batch_axes, head_axes = _split_axes(mesh, rules, q_bthd.shape[0], q_bthd.shape[2], k_cache_bksd.shape[1])
    q_spec, cache_spec = P(batch_axes, None, head_axes, None), P(batch_axes, head_axes, None, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, cache_spec, cache_spec, P(batch_axes)),
                         out_specs=q_spec, check_vma=False)(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b)
