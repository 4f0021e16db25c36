"""Decode attention: a few new queries per row against a KV cache with per-row lengths.

For generation (PPO rollouts, rejection sampling, evaluation): the new tokens' keys and values are already
written into the cache, q is (B, Tq, H, D) with Tq small (1 for plain sampling), the cache is head-major
(B, K, S, D), and `lengths` (B,) counts each row's valid entries. Query t of row b sits at position
lengths[b] - Tq + t and sees the cache up to it (`reference_decode_attention` is the definition); with a
sliding window W > 0 it sees positions > its own − W only.

One program serves one (row, K/V head): the G query heads of the group and the Tq new tokens form the
G·Tq rows of a single score tile, so the cache is read once per K/V head, not once per query head, and
cache blocks past a row's length, or wholly before the window of the row's earliest new token, are neither
computed nor loaded; positions on the window's edge are masked element-wise.
- TPU: cache blocks on an "arbitrary" grid axis, starting at the row's first block inside the window; the
  lengths are scalar-prefetched so the index map can find that block and point skipped steps at the block
  already resident. With a window the axis is only as long as the most blocks Tq + W − 1 positions can touch,
  so a step costs O(W) however long the cache.
- GPU (Triton): a loop over the row's blocks, from the first inside the window to the last within its length.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from llm_jax.kernels.attention import blocks as blk
from llm_jax.kernels.attention.flash_tpu import fold_scores, init_softmax_scratch
from llm_jax.kernels.attention.reference import MASK_VALUE, check_window

NUM_LANES = blk.NUM_LANES
DEFAULT_BLOCK_KV = {"tpu": 512, "triton": 64}
_NT = (((1,), (1,)), ((), ()))


def _online_softmax_step(q, k, v, visible, m, l, acc, scale):
    """One cache block folded into the running (max, sum, output); m and l are (rows, 1)-like columns."""
    s = blk.apply_mask(lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale, visible)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next)
    pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_next, alpha * l + jnp.sum(p, axis=1, keepdims=True), acc * alpha + pv


# ----------------------------------------------------------------------------------------------------- TPU
def _first_block(length, tq: int, block_kv: int, window: int):
    """The first cache block inside the window of a row's earliest new token (position length − Tq)."""
    return blk.first_key_block_in_window(length - tq, block_kv, window)


def _visible(k_start, pos, shape, window: int):
    """bool `shape`: cache position ≤ the row's position `pos` (a column), and > pos − W with a window."""
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    if not window:
        return k_pos <= pos
    return (k_pos <= pos) & (k_pos > pos - window)


def _tpu_kernel(lengths_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, m_scratch, l_scratch, acc_scratch, *,
                scale, block_kv, tq, window):
    row, j = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[row]
    k_start = (_first_block(length, tq, block_kv, window) + j) * block_kv
    head_dim = acc_scratch.shape[-1]

    pl.when(j == 0)(lambda: init_softmax_scratch(m_scratch, l_scratch, acc_scratch))

    @pl.when(k_start < length)
    def _step():
        rows = q_ref.shape[0]
        visible = _visible(k_start, blk.lanes(pos_ref[...], block_kv), (rows, block_kv), window)
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        fold_scores(blk.apply_mask(s, visible), v_ref[...], m_scratch, l_scratch, acc_scratch)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_scratch[...]
        l = jnp.where(l == 0.0, 1.0, l)  # a row of length 0 returns zeros, not NaN
        o_ref[...] = (acc_scratch[...] * blk.lanes(1.0 / l, head_dim)).astype(o_ref.dtype)


def _tpu_decode(q, k_cache, v_cache, positions, lengths, *, scale, block_kv, tq, window, interpret):
    b, n_kv, rows, d = q.shape
    s = k_cache.shape[2]
    # The Tq new tokens see Tq + W − 1 positions together, touching at most this many blocks.
    steps = min(blk.most_blocks_touched(tq + window - 1, block_kv), s // block_kv) if window else s // block_kv

    def cache_block(row, n, j, lengths_ref):
        length = lengths_ref[row]
        last = blk.div(jnp.maximum(length - 1, 0), block_kv)
        return (row, n, jnp.minimum(_first_block(length, tq, block_kv, window) + j, last), 0)

    q_spec = pl.BlockSpec((None, None, rows, d), lambda row, n, j, lengths_ref: (row, n, 0, 0))
    cache_spec = pl.BlockSpec((None, None, block_kv, d), cache_block)
    pos_spec = pl.BlockSpec((None, None, rows, NUM_LANES), lambda row, n, j, lengths_ref: (row, n, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, n_kv, steps),
        in_specs=[q_spec, cache_spec, cache_spec, pos_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((rows, NUM_LANES), jnp.float32), pltpu.VMEM((rows, NUM_LANES), jnp.float32),
                        pltpu.VMEM((rows, d), jnp.float32)])
    positions = jnp.broadcast_to(positions[:, None, :, None], (b, n_kv, rows, NUM_LANES))
    return pl.pallas_call(
        functools.partial(_tpu_kernel, scale=scale, block_kv=block_kv, tq=tq, window=window),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="decode_attention",
    )(lengths, q, k_cache, v_cache, positions)


# --------------------------------------------------------------------------------------------------- Triton
def _triton_kernel(length_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, *, scale, block_kv, tq, window):
    q, pos = q_ref[...], pos_ref[...]
    rows = q.shape[0]
    length = length_ref[...]

    def body(j, carry):
        k_start = pl.multiple_of(j * block_kv, block_kv)
        keys = pl.ds(k_start, block_kv)
        visible = _visible(k_start, pos[:, None], (rows, block_kv), window)
        return _online_softmax_step(q, k_ref[keys, :], v_ref[keys, :], visible, *carry, scale)

    carry = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    _, l, acc = lax.fori_loop(_first_block(length, tq, block_kv, window), blk.div(length + block_kv - 1, block_kv),
                              body, carry)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _triton_decode(q, k_cache, v_cache, positions, lengths, *, scale, block_kv, tq, window, interpret):
    b, n_kv, rows, d = q.shape
    s = k_cache.shape[2]
    q_spec = pl.BlockSpec((None, None, rows, d), lambda row, n: (row, n, 0, 0))
    return pl.pallas_call(
        functools.partial(_triton_kernel, scale=scale, block_kv=block_kv, tq=tq, window=window),
        grid=(b, n_kv),
        in_specs=[pl.BlockSpec((None,), lambda row, n: (row,)), q_spec,
                  pl.BlockSpec((None, None, s, d), lambda row, n: (row, n, 0, 0)),
                  pl.BlockSpec((None, None, s, d), lambda row, n: (row, n, 0, 0)),
                  pl.BlockSpec((None, rows), lambda row, n: (row, 0))],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(lengths, q, k_cache, v_cache, positions)


_FAMILIES = {"tpu": _tpu_decode, "triton": _triton_decode}


def _check(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b):
    if q_bthd.ndim != 4 or k_cache_bksd.ndim != 4 or k_cache_bksd.shape != v_cache_bksd.shape:
        raise ValueError(f"decode attention wants q (B, Tq, H, D) and caches (B, K, S, D) of one shape; got q "
                         f"{q_bthd.shape}, k cache {k_cache_bksd.shape}, v cache {v_cache_bksd.shape}")
    b, _, h, d = q_bthd.shape
    if k_cache_bksd.shape[0] != b or k_cache_bksd.shape[3] != d:
        raise ValueError(f"cache batch and head dim {k_cache_bksd.shape[0], k_cache_bksd.shape[3]} differ "
                         f"from q's {b, d}")
    if h % k_cache_bksd.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of the cache's key/value heads "
                         f"({k_cache_bksd.shape[1]})")
    if lengths_b.shape != (b,):
        raise ValueError(f"lengths of shape {lengths_b.shape} do not match the batch ({b},)")


def pallas_decode_attention(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b, *, window: int = 0,
                            block_kv: int | None = None, backend: str | None = None, interpret: bool = False):
    """Decode attention through the Pallas kernels; `backend` None picks the family per lowering platform."""
    check_window(window, True)
    _check(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b)
    b, tq, h, d = q_bthd.shape
    n_kv, s = k_cache_bksd.shape[1], k_cache_bksd.shape[2]
    window = window if window < s else 0  # it hides nothing of the cache: skip its mask work
    group = h // n_kv
    rows = group * tq
    padded_rows = max(16, 1 << (rows - 1).bit_length())  # Triton's dot wants ≥ 16 rows; TPU wants 8s
    # Rows ordered (group head, token): row r is token r % Tq.
    q_bkmd = jnp.transpose(q_bthd.reshape(b, tq, n_kv, group, d), (0, 2, 3, 1, 4)).reshape(b, n_kv, rows, d)
    q_bkmd = blk.pad_sequence(q_bkmd, 2, padded_rows)
    lengths = lengths_b.astype(jnp.int32)
    positions = lengths[:, None] - tq + jnp.tile(jnp.arange(tq, dtype=jnp.int32), group)[None, :]
    positions = blk.pad_sequence(positions, 1, padded_rows)

    def run(family, q_, k_, v_, pos_, len_, *, interpret):
        bk = min(block_kv or DEFAULT_BLOCK_KV[family], s)
        if s % bk:
            raise ValueError(f"decode attention: cache length {s} is not a multiple of the block size {bk}; "
                             f"allocate the cache in multiples of {bk}")
        return _FAMILIES[family](q_, k_, v_, pos_, len_, scale=d ** -0.5, block_kv=bk, tq=tq, window=window,
                                 interpret=interpret)

    args = (q_bkmd, k_cache_bksd, v_cache_bksd, positions, lengths)
    if backend is not None:
        out = run(backend, *args, interpret=interpret)
    else:
        out = lax.platform_dependent(
            *args, tpu=functools.partial(run, "tpu", interpret=False),
            cuda=functools.partial(run, "triton", interpret=False),
            rocm=functools.partial(run, "triton", interpret=False),
            default=functools.partial(run, "tpu", interpret=True))
    out = out[:, :, :rows].reshape(b, n_kv, group, tq, d)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, tq, h, d)
