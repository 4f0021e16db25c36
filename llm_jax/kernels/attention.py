"""Attention: one dispatch point for the whole codebase, with the pure-jnp reference as the definition.

Layout: q (B, T, H, D), k and v (B, S, K, D) with H a multiple of K (grouped-query attention: each K/V head
serves H/K query heads, never materialised as H heads). `segment_ids` (B, T) marks packed documents; a
query attends only to keys of its own segment, and segment 0 (padding) attends to nothing of value.
Pallas kernels plug in behind `attention(..., impl=...)` with this same signature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give no NaN


def reference_attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal=True):
    """softmax(q·kᵀ/√D + mask)·v, computed in float32 and returned in q's dtype."""
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    q_btkgd = q_bthd.reshape(b, t, kv, h // kv, d)
    scores_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd,
                              preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    mask_bts = jnp.ones((b, t, s), dtype=bool)
    if causal:
        mask_bts &= (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
    if segment_ids_bt is not None:
        if s != t:
            raise ValueError(f"segment ids need self-attention; got query length {t} and key length {s}")
        mask_bts &= segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _MASK_VALUE)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1)
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", probs_bkgts.astype(v_bskd.dtype), v_bskd,
                           preferred_element_type=jnp.float32)
    return out_btkgd.reshape(b, t, h, d).astype(q_bthd.dtype)


def attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal=True, impl="auto"):
    """Dispatches to the implementation named by `impl` (`auto` picks the best for the platform)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
    return reference_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt=segment_ids_bt, causal=causal)
