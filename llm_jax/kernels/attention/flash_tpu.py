"""Flash attention kernels for TPU (Mosaic): forward, dQ and dK/dV.

The key/value blocks are iterated on the last grid axis, marked "arbitrary" (sequential), with the running
max, sum and output held in VMEM scratch between grid steps, so only one (block, head_dim) tile of each
operand is resident and sequences of 8k–32k fit. The other grid axes are "parallel" and split across cores.

Causal skipping is real, not just masking: a skipped step runs no compute (`pl.when`), and its index map
points at the block already resident, so the pipeline issues no copy for it either.

Layout inside the kernels: q, dO (B, H, T, D); k, v (B, K, S, D); query head h reads key/value head
h // (H/K), so grouped-query K/V are never repeated. Row statistics live in 128-lane-replicated tiles
((rows, 128) or (8, cols)), the TPU's native orientation for broadcasting against a score tile.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm_jax.kernels.attention import blocks as blk
from llm_jax.kernels.attention.reference import MASK_VALUE

NUM_LANES, NUM_SUBLANES = blk.NUM_LANES, blk.NUM_SUBLANES
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a · bᵀ


def segment_layouts(segment_ids_bt):
    """Segment ids as a column tile (B, T, 128) and a row tile (B, 8, T)."""
    b, t = segment_ids_bt.shape
    seg = segment_ids_bt.astype(jnp.int32)
    return (jnp.broadcast_to(seg[:, :, None], (b, t, NUM_LANES)),
            jnp.broadcast_to(seg[:, None, :], (b, NUM_SUBLANES, t)))


def _params(n_arbitrary: int, n_parallel: int = 3):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def init_softmax_scratch(m_scratch, l_scratch, acc_scratch):
    """Running max, sum and output of an online softmax, before the first key block."""
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)


def fold_scores(s, v, m_scratch, l_scratch, acc_scratch):
    """Folds one block of masked, scaled scores (rows, block_kv) and its values into the running softmax."""
    m_prev = m_scratch[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - blk.lanes(m_next, s.shape[1]))
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scratch[...] = acc_scratch[...] * blk.lanes(alpha, acc_scratch.shape[-1]) + pv


def _run_causal_step(step, causal: bool, q_start, k_start, block_q: int, block_kv: int):
    """Runs `step(with_causal_mask)` on visible blocks: unmasked below the diagonal, masked on it."""
    if not causal:
        step(False)
        return
    below = blk.block_is_below_diagonal(q_start, k_start, block_kv)
    on_diagonal = jnp.logical_and(blk.block_is_visible(q_start, k_start, block_q), jnp.logical_not(below))
    pl.when(below)(lambda: step(False))
    pl.when(on_diagonal)(lambda: step(True))


# ----------------------------------------------------------------------------------------------- forward
def _forward_kernel(*refs, scale, causal, packed, block_q, block_kv):
    q_ref, k_ref, v_ref = refs[:3]
    q_seg_ref, kv_seg_ref = refs[3:5] if packed else (None, None)
    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs[5 if packed else 3:]
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, k_start = i * block_q, j * block_kv
    head_dim = acc_scratch.shape[-1]

    pl.when(j == 0)(lambda: init_softmax_scratch(m_scratch, l_scratch, acc_scratch))

    def step(with_causal_mask):
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, s.shape) if with_causal_mask else None,
            blk.lanes(q_seg_ref[...], block_kv) == kv_seg_ref[:1, :] if packed else None)
        fold_scores(blk.apply_mask(s, mask), v_ref[...], m_scratch, l_scratch, acc_scratch)

    _run_causal_step(step, causal, q_start, k_start, block_q, block_kv)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scratch[...]
        o_ref[...] = (acc_scratch[...] * blk.lanes(1.0 / l, head_dim)).astype(o_ref.dtype)
        # Transposed to rows: a (8, block_q) tile per block keeps the (B, H, 8, T) output 16× smaller than
        # the lane-replicated (block_q, 128) column, and it is the layout the dK/dV kernel reads.
        lse_ref[...] = jnp.transpose(m_scratch[...] + jnp.log(l))[:NUM_SUBLANES]


def forward(q, k, v, segment_ids, *, scale, causal, blocks, interpret):
    """(o (B, H, T, D), lse (B, H, T) f32) for padded, block-aligned inputs."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group, bq, bk = h // n_kv, blocks.q, blocks.kv
    packed = segment_ids is not None

    def kv_block(i, j):
        return jnp.minimum(j, blk.last_visible_block(i, bq, bk)) if causal else j

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, blk.div(h_, group), kv_block(i, j), 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if packed:
        seg_col, seg_row = segment_layouts(segment_ids)
        in_specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda b_, h_, i, j: (b_, i, 0)),
                     pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j)))]
        args += [seg_col, seg_row]
    kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, packed=packed,
                               block_q=bq, block_kv=bk)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, t // bq, s // bk),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, NUM_SUBLANES, bq), lambda b_, h_, i, j: (b_, h_, 0, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, NUM_SUBLANES, t), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(n_arbitrary=1),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
    return out, lse[:, :, 0]


# -------------------------------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, scale, causal, packed, block_q, block_kv):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_seg_ref, kv_seg_ref = refs[6:8] if packed else (None, None)
    dq_ref, dq_scratch = refs[8 if packed else 6:]
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, k_start = i * block_q, j * block_kv

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    def step(with_causal_mask):
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, s.shape) if with_causal_mask else None,
            blk.lanes(q_seg_ref[...], block_kv) == kv_seg_ref[:1, :] if packed else None)
        s = blk.apply_mask(s, mask)
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.expand_dims(delta_ref[0], -1))
        dq_scratch[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _run_causal_step(step, causal, q_start, k_start, block_q, block_kv)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------- dK, dV
def _dkdv_kernel(*refs, scale, causal, packed, block_q, block_kv):
    # Scores are computed transposed, (block_kv, block_q), so the per-query statistics are rows and
    # broadcast along sublanes, and dK, dV are plain (untransposed) matmuls.
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_seg_ref, kv_seg_ref = refs[6:8] if packed else (None, None)
    dk_ref, dv_ref, dk_scratch, dv_scratch = refs[8 if packed else 6:]
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_start, k_start = i * block_q, j * block_kv

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    def step(with_causal_mask):
        q, do = q_ref[...], do_ref[...]
        st = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, st.shape, q_axis=1) if with_causal_mask else None,
            blk.lanes(kv_seg_ref[...], block_q) == q_seg_ref[:1, :] if packed else None)
        st = blk.apply_mask(st, mask)
        pt = jnp.exp(st - lse_ref[:1, :])
        dv_scratch[...] += lax.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[:1, :])
        dk_scratch[...] += lax.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _run_causal_step(step, causal, q_start, k_start, block_q, block_kv)

    @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1, i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, lse, delta, do, *, scale, causal, blocks, interpret):
    """(dq, dk, dv) for padded, block-aligned inputs; lse and delta = rowsum(dO·O) are (B, H, T) f32."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group = h // n_kv
    packed = segment_ids is not None
    seg_col, seg_row = segment_layouts(segment_ids) if packed else (None, None)
    flags = dict(scale=scale, causal=causal, packed=packed)

    # dQ: the forward's grid, with the key blocks sequential.
    bq, bk = blocks.q, blocks.kv

    def kv_block(i, j):
        return jnp.minimum(j, blk.last_visible_block(i, bq, bk)) if causal else j

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, blk.div(h_, group), kv_block(i, j), 0))
    stat_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
    args = [q, k, v, do, lse[:, :, None, :], delta[:, :, None, :]]
    if packed:
        in_specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda b_, h_, i, j: (b_, i, 0)),
                     pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j)))]
        args += [seg_col, seg_row]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=bq, block_kv=bk, **flags),
        grid=(b, h, t // bq, s // bk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(n_arbitrary=1),
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)

    # dK, dV: one key block per parallel step; the query heads of its group and the query blocks sequential.
    bq, bk = blocks.q_bwd, blocks.kv_bwd

    def q_block(j, i):
        return jnp.maximum(i, blk.first_visible_block(j, bq, bk)) if causal else i

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, n, j, g, i: (b_, n * group + g, q_block(j, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, n, j, g, i: (b_, n, j, 0))
    stat_spec = pl.BlockSpec((None, None, NUM_SUBLANES, bq),
                             lambda b_, n, j, g, i: (b_, n * group + g, 0, q_block(j, i)))
    rows = (b, h, NUM_SUBLANES, t)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
    args = [q, k, v, do, jnp.broadcast_to(lse[:, :, None, :], rows), jnp.broadcast_to(delta[:, :, None, :], rows)]
    if packed:
        in_specs += [pl.BlockSpec((None, NUM_SUBLANES, bq), lambda b_, n, j, g, i: (b_, 0, q_block(j, i))),
                     pl.BlockSpec((None, bk, NUM_LANES), lambda b_, n, j, g, i: (b_, j, 0))]
        args += [seg_row, seg_col]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=bq, block_kv=bk, **flags),
        grid=(b, n_kv, s // bk, group, t // bq),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(n_arbitrary=2),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*args)
    return dq, dk, dv
