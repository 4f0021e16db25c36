"""Flash attention kernels for NVIDIA/AMD GPUs through Pallas' Triton backend: forward, dQ and dK/dV.

Each program owns one query block (forward, dQ) or one key block (dK/dV) and loops over the other side
with `fori_loop`; a causal loop stops at the diagonal, so blocks above it are never loaded. A sliding window
W > 0 bounds the other end: the forward and dQ loops start at the first key block inside the query block's
window, the dK/dV loop stops at the last query block whose window holds the key block, so blocks wholly outside
the window are never loaded either and a query block costs O(W), not O(T). The loop is split into ranges: blocks
wholly below the diagonal and wholly inside the window run without a mask, those on the diagonal or on the
window's edge with it.

Layout as in `flash_tpu`: q, dO (B, H, T, D); k, v (B, K, S, D). Grouped-query heads read their shared
K/V head by index; the dK/dV program of a K/V head loops over the query heads of its group.

Pallas' Triton backend is announced as deprecated in later JAX releases (Mosaic GPU succeeds it); this
module keeps the `forward`/`backward` interface of `flash_tpu`, so a Mosaic GPU family can replace it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from llm_jax.kernels.attention import blocks as blk
from llm_jax.kernels.attention.reference import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a · bᵀ


def _params(head_dim: int):
    return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _nt(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot(a, b, preferred_element_type=jnp.float32)


def _key_block_loops(q_block, block_q: int, block_kv: int, n_kv: int, causal: bool, window: int):
    """(start, stop, with_mask) loops over the key blocks a query block sees: the window's edge masked, then the
    blocks wholly below the diagonal and inside the window unmasked, then the diagonal masked."""
    if not causal:
        return [(0, n_kv, False)]
    first, last = blk.key_block_range(q_block, block_q, block_kv, n_kv, causal, window)
    end = last + 1
    q_start = q_block * block_q
    first_masked = jnp.clip(blk.div(q_start + 1, block_kv), first, end)  # the diagonal's first block
    if not window:
        return [(0, first_masked, False), (first_masked, end, True)]
    first_inside = jnp.clip(blk.first_key_block_inside_window(q_start, block_q, block_kv, window), first, first_masked)
    return [(first, first_inside, True), (first_inside, first_masked, False), (first_masked, end, True)]


def _query_block_loops(kv_block, block_q: int, block_kv: int, n_q: int, causal: bool, window: int):
    """(start, stop, with_mask) loops over the query blocks that see a key block: the diagonal masked, then the
    blocks wholly below it and inside the window unmasked, then the window's edge masked."""
    if not causal:
        return [(0, n_q, False)]
    first, last = blk.query_block_range(kv_block, block_q, block_kv, n_q, causal, window)
    end = last + 1
    k_start = kv_block * block_kv
    # the first query block wholly after the key block: its first query is at or after the block's last key
    first_unmasked = jnp.clip(blk.div(k_start + block_kv - 1 + block_q - 1, block_q), first, end)
    if not window:
        return [(first, first_unmasked, True), (first_unmasked, end, False)]
    end_inside = jnp.clip(blk.end_of_query_blocks_inside_window(k_start, block_q, window, n_q), first_unmasked, end)
    return [(first, first_unmasked, True), (first_unmasked, end_inside, False), (end_inside, end, True)]


def _loop(body, carry, loops):
    """carry = body(index, carry, with_mask) over each (start, stop, with_mask) loop in turn."""
    for start, stop, with_mask in loops:
        carry = lax.fori_loop(start, stop, functools.partial(body, with_mask=with_mask), carry)
    return carry


# ----------------------------------------------------------------------------------------------- forward
def _forward_kernel(*refs, scale, causal, window, packed, block_q, block_kv, seq_kv):
    q_ref, k_ref, v_ref = refs[:3]
    q_seg_ref, kv_seg_ref = refs[3:5] if packed else (None, None)
    o_ref, lse_ref = refs[5 if packed else 3:]
    q_block = pl.program_id(2)
    q_start = q_block * block_q
    q = q_ref[...]
    q_seg = q_seg_ref[...] if packed else None

    def body(j, carry, with_mask):
        m, l, acc = carry
        k_start = pl.multiple_of(j * block_kv, block_kv)
        keys = pl.ds(k_start, block_kv)
        s = _nt(q, k_ref[keys, :]) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, s.shape, window=window) if with_mask else None,
            q_seg[:, None] == kv_seg_ref[keys][None, :] if packed else None)
        s = blk.apply_mask(s, mask)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = v_ref[keys, :]
        return m_next, alpha * l + jnp.sum(p, axis=1), acc * alpha[:, None] + _dot(p.astype(v.dtype), v)

    carry = (jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    m, l, acc = _loop(body, carry, _key_block_loops(q_block, block_q, block_kv, seq_kv // block_kv, causal, window))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def forward(q, k, v, segment_ids, *, scale, causal, window, blocks, interpret):
    """(o (B, H, T, D), lse (B, H, T) f32) for padded, block-aligned inputs."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group, bq, bk = h // n_kv, blocks.q, blocks.kv
    packed = segment_ids is not None
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, blk.div(h_, group), 0, 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if packed:
        in_specs += [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                     pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))]
        args += [segment_ids, segment_ids]
    kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, window=window, packed=packed,
                               block_q=bq, block_kv=bk, seq_kv=s)
    return pl.pallas_call(
        kernel,
        grid=(b, h, t // bq),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(d),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)


# -------------------------------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, scale, causal, window, packed, block_q, block_kv, seq_kv):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_seg_ref, kv_seg_ref = refs[6:8] if packed else (None, None)
    (dq_ref,) = refs[8 if packed else 6:]
    q_block = pl.program_id(2)
    q_start = q_block * block_q
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if packed else None

    def body(j, dq, with_mask):
        k_start = pl.multiple_of(j * block_kv, block_kv)
        keys = pl.ds(k_start, block_kv)
        k = k_ref[keys, :]
        s = _nt(q, k) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, s.shape, window=window) if with_mask else None,
            q_seg[:, None] == kv_seg_ref[keys][None, :] if packed else None)
        p = jnp.exp(blk.apply_mask(s, mask) - lse[:, None])
        ds = p * (_nt(do, v_ref[keys, :]) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _loop(body, jnp.zeros(q.shape, jnp.float32),
               _key_block_loops(q_block, block_q, block_kv, seq_kv // block_kv, causal, window))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------- dK, dV
def _dkdv_kernel(*refs, scale, causal, window, packed, block_q, block_kv, seq_q, group):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_seg_ref, kv_seg_ref = refs[6:8] if packed else (None, None)
    dk_ref, dv_ref = refs[8 if packed else 6:]
    kv_block = pl.program_id(2)
    k_start = kv_block * block_kv
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if packed else None
    loops = _query_block_loops(kv_block, block_q, block_kv, seq_q // block_q, causal, window)

    def body(i, carry, g, with_mask):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[g, rows, :], do_ref[g, rows, :]
        st = _nt(k, q) * scale  # (block_kv, block_q): per-query statistics broadcast as rows
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, st.shape, q_axis=1, window=window) if with_mask else None,
            kv_seg[:, None] == q_seg_ref[rows][None, :] if packed else None)
        pt = jnp.exp(blk.apply_mask(st, mask) - lse_ref[g, rows][None, :])
        dv = dv + _dot(pt.astype(do.dtype), do)
        dst = pt * (_nt(v, do) - delta_ref[g, rows][None, :])
        return dk + _dot(dst.astype(q.dtype), q), dv

    def head(g, carry):
        return _loop(functools.partial(body, g=g), carry, loops)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, lse, delta, do, *, scale, causal, window, blocks, interpret):
    """(dq, dk, dv) for padded, block-aligned inputs; lse and delta = rowsum(dO·O) are (B, H, T) f32."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group = h // n_kv
    packed = segment_ids is not None
    flags = dict(scale=scale, causal=causal, window=window, packed=packed)

    bq, bk = blocks.q, blocks.kv
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, blk.div(h_, group), 0, 0))
    stat_spec = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
    in_specs, args = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec], [q, k, v, do, lse, delta]
    if packed:
        in_specs += [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                     pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))]
        args += [segment_ids, segment_ids]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=bq, block_kv=bk, seq_kv=s, **flags),
        grid=(b, h, t // bq),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(d),
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)

    bq, bk = blocks.q_bwd, blocks.kv_bwd
    group_spec = pl.BlockSpec((None, group, t, d), lambda b_, n, j: (b_, n, 0, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, n, j: (b_, n, j, 0))
    stat_spec = pl.BlockSpec((None, group, t), lambda b_, n, j: (b_, n, 0))
    in_specs, args = [group_spec, kv_spec, kv_spec, group_spec, stat_spec, stat_spec], [q, k, v, do, lse, delta]
    if packed:
        in_specs += [pl.BlockSpec((None, t), lambda b_, n, j: (b_, 0)),
                     pl.BlockSpec((None, bk), lambda b_, n, j: (b_, j))]
        args += [segment_ids, segment_ids]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=bq, block_kv=bk, seq_q=t, group=group, **flags),
        grid=(b, n_kv, s // bk),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(d),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*args)
    return dq, dk, dv
