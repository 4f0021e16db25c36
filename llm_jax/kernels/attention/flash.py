"""Flash attention (Dao et al. 2022; FlashAttention-2's work split) as Pallas kernels with a custom VJP.

`flash_attention` takes the model's layout, q (B, T, H, D) and k, v (B, S, K, D), and returns softmax
attention in q's dtype with float32 accumulation. The forward saves only the output and the per-row
log-sum-exp; the backward recomputes probabilities block by block in two kernels (dQ, and dK/dV).

Kernel family by platform, chosen when the program is lowered (`lax.platform_dependent`), so one traced
function lowers for TPU and for GPU alike, even from a CPU host:
- TPU: `flash_tpu` (Mosaic), key blocks on an "arbitrary" grid axis with VMEM accumulators.
- CUDA and ROCm: `flash_triton` (Pallas Triton).
- anything else (CPU): `flash_tpu` in interpret mode, for tests; production CPU runs use `impl="xla"`.
`backend="tpu"` or `"triton"` forces one family (with `interpret=True` to run it on CPU).

A sliding window W > 0 (causal only; key s visible to query t when t − W < s ≤ t) is a static argument of
every kernel: key blocks wholly outside the window are skipped like those above the diagonal (not computed, not
loaded; on TPU not even iterated, so long sequences cost O(T·W)), blocks on the window's edge get an
element-wise mask, and those wholly inside it and below the diagonal none (`blocks.py` has the geometry). A
window at least as long as the sequence is plain causal attention and runs as such.

Sequences that are not a multiple of the block size are padded to one; padded keys get their own segment
(or fall after every real query under a causal mask, which a window only narrows), so they never receive weight.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.kernels.attention import blocks as blk
from llm_jax.kernels.attention import flash_tpu, flash_triton
from llm_jax.kernels.attention.reference import check_window

FAMILIES = {"tpu": flash_tpu, "triton": flash_triton}
# Names of the forward's residuals, for remat policies that keep them (model.remat="dots_attention").
RESIDUAL_NAMES = ("attention_out", "attention_lse")
BACKENDS = (None, "tpu", "triton")


def _check_shapes(q_bthd, k_bskd, v_bskd, segment_ids_bt, causal: bool):
    if q_bthd.ndim != 4 or k_bskd.ndim != 4 or k_bskd.shape != v_bskd.shape:
        raise ValueError(f"flash attention wants q (B, T, H, D) and k, v (B, S, K, D) of one shape; got q "
                         f"{q_bthd.shape}, k {k_bskd.shape}, v {v_bskd.shape}")
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if k_bskd.shape[0] != b or k_bskd.shape[3] != d:
        raise ValueError(f"k/v batch and head dim {k_bskd.shape[0], k_bskd.shape[3]} differ from q's {b, d}")
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    if d < 16 or d > 256 or (d > 128 and d % 128):
        raise ValueError(f"flash attention supports head dims 16–128, or 256; got {d}")
    if (causal or segment_ids_bt is not None) and s != t:
        raise ValueError(f"causal or packed flash attention needs self-attention; got query length {t}, "
                         f"key length {s}")
    if segment_ids_bt is not None and segment_ids_bt.shape != (b, t):
        raise ValueError(f"segment ids of shape {segment_ids_bt.shape} do not match (batch, length) = {b, t}")


def _pad(q, k, v, segment_ids, causal: bool, blocks: blk.BlockSizes):
    """Pads the sequence to a block multiple; returns what the kernels need and the padded length."""
    t = q.shape[2]
    padded = blocks.padded_length(max(t, k.shape[2]))
    if segment_ids is None and padded != t and not causal:
        segment_ids = jnp.zeros(q.shape[:1] + (t,), jnp.int32)
    if segment_ids is not None:
        segment_ids = blk.pad_sequence(segment_ids.astype(jnp.int32), 1, padded, blk.PAD_SEGMENT)
    return (blk.pad_sequence(q, 2, padded), blk.pad_sequence(k, 2, padded), blk.pad_sequence(v, 2, padded),
            segment_ids)


def _family_forward(family, q, k, v, segment_ids, *, causal, window, blocks, interpret):
    blocks = (blocks or blk.DEFAULT_BLOCKS[family]).fitted(max(q.shape[2], k.shape[2]))
    t = q.shape[2]
    qp, kp, vp, seg = _pad(q, k, v, segment_ids, causal, blocks)
    out, lse = FAMILIES[family].forward(qp, kp, vp, seg, scale=q.shape[-1] ** -0.5, causal=causal,
                                        window=window, blocks=blocks, interpret=interpret)
    return out[:, :, :t], lse[:, :, :t]


def _family_backward(family, q, k, v, segment_ids, out, lse, do, *, causal, window, blocks, interpret):
    blocks = (blocks or blk.DEFAULT_BLOCKS[family]).fitted(max(q.shape[2], k.shape[2]))
    t, s = q.shape[2], k.shape[2]
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    qp, kp, vp, seg = _pad(q, k, v, segment_ids, causal, blocks)
    padded = qp.shape[2]
    dq, dk, dv = FAMILIES[family].backward(
        qp, kp, vp, seg, blk.pad_sequence(lse, 2, padded), blk.pad_sequence(delta, 2, padded),
        blk.pad_sequence(do, 2, padded), scale=q.shape[-1] ** -0.5, causal=causal, window=window, blocks=blocks,
        interpret=interpret)
    return dq[:, :, :t], dk[:, :, :s], dv[:, :, :s]


def _by_platform(fn, backend, interpret, *args):
    """Runs `fn(family, *args, interpret=…)` for the family of the platform the program is lowered for."""
    if backend is not None:
        return fn(backend, *args, interpret=interpret)
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(fn, "tpu", interpret=False),
        cuda=functools.partial(fn, "triton", interpret=False),
        rocm=functools.partial(fn, "triton", interpret=False),
        default=functools.partial(fn, "tpu", interpret=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, segment_ids, causal, window, blocks, backend, interpret):
    return _flash_fwd(q, k, v, segment_ids, causal, window, blocks, backend, interpret)[0]


def _flash_fwd(q, k, v, segment_ids, causal, window, blocks, backend, interpret):
    fwd = functools.partial(_family_forward, causal=causal, window=window, blocks=blocks)
    out, lse = _by_platform(lambda fam, *a, interpret: fwd(fam, *a, interpret=interpret),
                            backend, interpret, q, k, v, segment_ids)
    out, lse = (checkpoint_name(x, name) for x, name in zip((out, lse), RESIDUAL_NAMES))
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(causal, window, blocks, backend, interpret, residuals, do):
    q, k, v, segment_ids, out, lse = residuals
    bwd = functools.partial(_family_backward, causal=causal, window=window, blocks=blocks)
    dq, dk, dv = _by_platform(lambda fam, *a, interpret: bwd(fam, *a, interpret=interpret),
                              backend, interpret, q, k, v, segment_ids, out, lse, do)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal: bool = True, window: int = 0,
                    blocks: blk.BlockSizes | None = None, backend: str | None = None, interpret: bool = False):
    """Softmax attention through the Pallas flash kernels; see the module docstring for the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"flash attention backend {backend!r} is not one of {BACKENDS}")
    check_window(window, causal)
    _check_shapes(q_bthd, k_bskd, v_bskd, segment_ids_bt, causal)
    window = window if window < q_bthd.shape[1] else 0  # it hides nothing: skip its mask work
    to_heads = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731  (B, T, H, D) ↔ (B, H, T, D)
    out = _flash(to_heads(q_bthd), to_heads(k_bskd), to_heads(v_bskd), segment_ids_bt, causal, window, blocks,
                 backend, interpret)
    return to_heads(out)
