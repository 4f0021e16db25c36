"""Flash attention kernels for TPU (Mosaic): forward, dQ and dK/dV.

The key/value blocks are iterated on the last grid axis, marked "arbitrary" (sequential), with the running
max, sum and output held in VMEM scratch between grid steps, so only one (block, head_dim) tile of each
operand is resident and sequences of 8k–32k fit. The other grid axes are "parallel" and split across cores.

Causal and sliding-window skipping is real, not just masking. The sequential axis walks only the range of
blocks the other side can see (`blocks.key_block_range`, `blocks.query_block_range`): from the first key block
inside the window of a query block to its diagonal, or from the diagonal of a key block to the last query block
whose window still holds it. With a window W that axis has about W / block + 1 steps instead of T / block, so long
sequences cost O(T·W). The axis is as long as the longest range; a step past a shorter range runs no compute
(`pl.when`), and its index map points at the block already resident, so the pipeline issues no copy for it either.
Blocks wholly below the diagonal and wholly inside the window run unmasked; the edges get an element-wise mask.

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


def _run_step(step, causal: bool, window: int, in_range, q_start, k_start, block_q: int, block_kv: int):
    """Runs `step(with_mask)` on a block in its range: unmasked wholly below the diagonal and inside the window,
    masked on the diagonal or the window's edge; a step past the range (`in_range` false) does nothing."""
    if not causal:  # no skipping: every step is in range
        step(False)
        return
    unmasked = jnp.logical_and(blk.block_is_below_diagonal(q_start, k_start, block_kv),
                               blk.block_is_inside_window(q_start, k_start, block_q, window))
    pl.when(jnp.logical_and(in_range, unmasked))(lambda: step(False))
    pl.when(jnp.logical_and(in_range, jnp.logical_not(unmasked)))(lambda: step(True))


def _kv_index(causal: bool, window: int, block_q: int, block_kv: int, n_kv: int):
    """kv_block(i, j): the key block of query block i's j-th step; steps past its range repeat its last block."""
    def kv_block(i, j):
        first, last = blk.key_block_range(i, block_q, block_kv, n_kv, causal, window)
        return blk.minimum(first + j, last)
    return kv_block


# ----------------------------------------------------------------------------------------------- forward
def _forward_kernel(*refs, scale, causal, window, packed, block_q, block_kv, n_kv):
    q_ref, k_ref, v_ref = refs[:3]
    q_seg_ref, kv_seg_ref = refs[3:5] if packed else (None, None)
    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs[5 if packed else 3:]
    i, j = pl.program_id(2), pl.program_id(3)
    first, last = blk.key_block_range(i, block_q, block_kv, n_kv, causal, window)
    q_start, k_start = i * block_q, (first + j) * block_kv
    head_dim = acc_scratch.shape[-1]

    pl.when(j == 0)(lambda: init_softmax_scratch(m_scratch, l_scratch, acc_scratch))

    def step(with_mask):
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, s.shape, window=window) if with_mask else None,
            blk.lanes(q_seg_ref[...], block_kv) == kv_seg_ref[:1, :] if packed else None)
        fold_scores(blk.apply_mask(s, mask), v_ref[...], m_scratch, l_scratch, acc_scratch)

    _run_step(step, causal, window, first + j <= last, q_start, k_start, block_q, block_kv)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scratch[...]
        o_ref[...] = (acc_scratch[...] * blk.lanes(1.0 / l, head_dim)).astype(o_ref.dtype)
        # Transposed to rows: a (8, block_q) tile per block keeps the (B, H, 8, T) output 16× smaller than
        # the lane-replicated (block_q, 128) column, and it is the layout the dK/dV kernel reads.
        lse_ref[...] = jnp.transpose(m_scratch[...] + jnp.log(l))[:NUM_SUBLANES]


def forward(q, k, v, segment_ids, *, scale, causal, window, blocks, interpret):
    """(o (B, H, T, D), lse (B, H, T) f32) for padded, block-aligned inputs."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group, bq, bk = h // n_kv, blocks.q, blocks.kv
    packed = segment_ids is not None
    kv_block = _kv_index(causal, window, bq, bk, s // bk)
    steps = blk.most_blocks_in_a_range(lambda i: blk.key_block_range(i, bq, bk, s // bk, causal, window), t // bq)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, blk.div(h_, group), kv_block(i, j), 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if packed:
        seg_col, seg_row = segment_layouts(segment_ids)
        in_specs += [pl.BlockSpec((None, bq, NUM_LANES), lambda b_, h_, i, j: (b_, i, 0)),
                     pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j)))]
        args += [seg_col, seg_row]
    kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, window=window, packed=packed,
                               block_q=bq, block_kv=bk, n_kv=s // bk)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, t // bq, steps),
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
def _dq_kernel(*refs, scale, causal, window, packed, block_q, block_kv, n_kv):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_seg_ref, kv_seg_ref = refs[6:8] if packed else (None, None)
    dq_ref, dq_scratch = refs[8 if packed else 6:]
    i, j = pl.program_id(2), pl.program_id(3)
    first, last = blk.key_block_range(i, block_q, block_kv, n_kv, causal, window)
    q_start, k_start = i * block_q, (first + j) * block_kv

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    def step(with_mask):
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, s.shape, window=window) if with_mask else None,
            blk.lanes(q_seg_ref[...], block_kv) == kv_seg_ref[:1, :] if packed else None)
        s = blk.apply_mask(s, mask)
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.expand_dims(delta_ref[0], -1))
        dq_scratch[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _run_step(step, causal, window, first + j <= last, q_start, k_start, block_q, block_kv)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------- dK, dV
def _dkdv_kernel(*refs, scale, causal, window, packed, block_q, block_kv, n_q):
    # Scores are computed transposed, (block_kv, block_q), so the per-query statistics are rows and
    # broadcast along sublanes, and dK, dV are plain (untransposed) matmuls.
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_seg_ref, kv_seg_ref = refs[6:8] if packed else (None, None)
    dk_ref, dv_ref, dk_scratch, dv_scratch = refs[8 if packed else 6:]
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first, last = blk.query_block_range(j, block_q, block_kv, n_q, causal, window)
    q_start, k_start = (first + i) * block_q, j * block_kv

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    def step(with_mask):
        q, do = q_ref[...], do_ref[...]
        st = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * scale
        mask = blk.and_masks(
            blk.causal_mask(q_start, k_start, st.shape, q_axis=1, window=window) if with_mask else None,
            blk.lanes(kv_seg_ref[...], block_q) == q_seg_ref[:1, :] if packed else None)
        st = blk.apply_mask(st, mask)
        pt = jnp.exp(st - lse_ref[:1, :])
        dv_scratch[...] += lax.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[:1, :])
        dk_scratch[...] += lax.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _run_step(step, causal, window, first + i <= last, q_start, k_start, block_q, block_kv)

    @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1, i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, lse, delta, do, *, scale, causal, window, blocks, interpret):
    """(dq, dk, dv) for padded, block-aligned inputs; lse and delta = rowsum(dO·O) are (B, H, T) f32."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group = h // n_kv
    packed = segment_ids is not None
    seg_col, seg_row = segment_layouts(segment_ids) if packed else (None, None)
    flags = dict(scale=scale, causal=causal, window=window, packed=packed)

    # dQ: the forward's grid, with the key blocks sequential.
    bq, bk = blocks.q, blocks.kv
    kv_block = _kv_index(causal, window, bq, bk, s // bk)
    steps = blk.most_blocks_in_a_range(lambda i: blk.key_block_range(i, bq, bk, s // bk, causal, window), t // bq)

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
        functools.partial(_dq_kernel, block_q=bq, block_kv=bk, n_kv=s // bk, **flags),
        grid=(b, h, t // bq, steps),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(n_arbitrary=1),
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)

    # dK, dV: one key block per parallel step; the query heads of its group and the query blocks sequential,
    # the latter over the range that sees the key block, a step past it repeating the range's last block.
    bq, bk = blocks.q_bwd, blocks.kv_bwd

    def q_block(j, i):
        first, last = blk.query_block_range(j, bq, bk, t // bq, causal, window)
        return blk.minimum(first + i, last)
    steps = blk.most_blocks_in_a_range(lambda j: blk.query_block_range(j, bq, bk, t // bq, causal, window), s // bk)

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
        functools.partial(_dkdv_kernel, block_q=bq, block_kv=bk, n_q=t // bq, **flags),
        grid=(b, n_kv, s // bk, group, steps),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(n_arbitrary=2),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*args)
    return dq, dk, dv
