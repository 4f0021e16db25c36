"""Attention in plain XLA with a FlashAttention-style backward: the best path where no kernel serves (CPU)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llm_jax.kernels.attention.reference import MASK_VALUE, attention_mask


def _masked_scores(q_bkmd, k_bksd, mask_bts, g: int):
    """Scaled, masked scores (B, K, G·T, S); q is already multiplied by 1/√D."""
    b, kv, m, _ = q_bkmd.shape
    t, s = m // g, k_bksd.shape[2]
    scores = jnp.einsum("bkmd,bksd->bkms", q_bkmd, k_bksd, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores.reshape(b, kv, g, t, s), MASK_VALUE)
    return scores.reshape(b, kv, m, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xla_attention(q_bkmd, k_bksd, v_bksd, mask_bts, g, dtype):
    return _xla_attention_fwd(q_bkmd, k_bksd, v_bksd, mask_bts, g, dtype)[0]


def _xla_attention_fwd(q_bkmd, k_bksd, v_bksd, mask_bts, g, dtype):
    scores = _masked_scores(q_bkmd, k_bksd, mask_bts, g)
    max_bkm = jnp.max(scores, axis=-1, keepdims=True)
    unnorm = jnp.exp(scores - max_bkm)
    sum_bkm = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = jnp.einsum("bkms,bksd->bkmd", unnorm.astype(v_bksd.dtype), v_bksd, preferred_element_type=jnp.float32)
    out = (out / sum_bkm).astype(dtype)
    return out, (q_bkmd, k_bksd, v_bksd, mask_bts, out, max_bkm + jnp.log(sum_bkm))


def _xla_attention_bwd(g, dtype, residuals, dout_bkmd):
    # FlashAttention's backward (Dao et al. 2022, alg. 4) without tiling: the probabilities are recomputed
    # from the saved log-sum-exp instead of being stored, and softmax's backward uses rowsum(dO·O) (a
    # (B, K, G·T) vector) instead of a second pass over the (T, S) probabilities.
    q_bkmd, k_bksd, v_bksd, mask_bts, out, lse_bkm = residuals
    probs = jnp.exp(_masked_scores(q_bkmd, k_bksd, mask_bts, g) - lse_bkm)
    dout32 = dout_bkmd.astype(jnp.float32)
    dv = jnp.einsum("bkms,bkmd->bksd", probs.astype(dout_bkmd.dtype), dout_bkmd,
                    preferred_element_type=jnp.float32)
    dprobs = jnp.einsum("bkmd,bksd->bkms", dout_bkmd, v_bksd, preferred_element_type=jnp.float32)
    delta_bkm = jnp.sum(dout32 * out.astype(jnp.float32), axis=-1, keepdims=True)
    dscores = (probs * (dprobs - delta_bkm)).astype(q_bkmd.dtype)
    dq = jnp.einsum("bkms,bksd->bkmd", dscores, k_bksd, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkms,bkmd->bksd", dscores, q_bkmd, preferred_element_type=jnp.float32)
    return dq.astype(q_bkmd.dtype), dk.astype(k_bksd.dtype), dv.astype(v_bksd.dtype), None


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def xla_attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal=True, window: int = 0, positions_bt=None):
    """The reference's maths with a memory-light custom backward; every (B, H, T, S) array is transient.

    Masked as the reference masks (`attention_mask`): the prompt segment and a window in positions included.

    Query heads are laid out (B, K, G·T, D) so grouped-query attention is one batched matmul per K/V head.
    """
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    g = h // kv
    mask_bts = attention_mask(segment_ids_bt, b, t, s, causal, window, positions_bt)
    scale = (1.0 / jnp.sqrt(jnp.float32(d))).astype(q_bthd.dtype)
    q_bkmd = jnp.transpose((q_bthd * scale).reshape(b, t, kv, g, d), (0, 2, 3, 1, 4)).reshape(b, kv, g * t, d)
    k_bksd = jnp.transpose(k_bskd, (0, 2, 1, 3))
    v_bksd = jnp.transpose(v_bskd, (0, 2, 1, 3))
    out = _xla_attention(q_bkmd, k_bksd, v_bksd, mask_bts, g, q_bthd.dtype)
    return jnp.transpose(out.reshape(b, kv, g, t, d), (0, 3, 1, 2, 4)).reshape(b, t, h, d)
