"""The pure-jnp reference attention: the definition every other implementation is tested against.

Layout: q (B, T, H, D), k and v (B, S, K, D) with H a multiple of K (grouped-query attention: each K/V head
serves H/K query heads, never materialised as H heads). `segment_ids` (B, T) marks packed documents; a
query attends only to keys of its own segment, and segment 0 (padding) attends to nothing of value.
`window` W > 0 (sliding-window attention, Mistral's and Gemma's local layers) also hides keys W or more
positions behind the query: key s is visible to query t when t − W < s ≤ t. W = 0 is no window.

A soft prompt shared by the packed segments of a row (prompt tuning, model/prompt_tuning.py) has the segment id
`PROMPT_SEGMENT`: its keys are visible to every query but padding's (still causally: the prompt comes first),
and its own queries see only the prompt. With `positions_bt` (B, T) given, the window is measured between
positions instead of row indices: the same thing inside a segment, and for the prompt's keys the distance each
segment would have to a prompt prepended to it alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give no NaN
PROMPT_SEGMENT = -1  # the segment id of a soft prompt: visible to every non-padding segment of its row


def check_window(window: int, causal: bool) -> None:
    if window < 0:
        raise ValueError(f"attention window must be ≥ 0 (0: none), got {window}")
    if window and not causal:
        raise ValueError(f"a sliding attention window (window={window}) needs causal attention")


def attention_mask(segment_ids_bt, b: int, t: int, s: int, causal: bool, window: int = 0, positions_bt=None):
    """(B, T, S) bool: key s is visible to query t (causal: s ≤ t; packed: same segment, or the key is in the
    prompt segment and the query is not padding; window: t − W < s, in positions where `positions_bt` is given)."""
    check_window(window, causal)
    mask_bts = jnp.ones((b, t, s), dtype=bool)
    if causal:
        mask_bts &= (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
    if window and positions_bt is not None:
        if s != t:
            raise ValueError(f"positions need self-attention; got query length {t} and key length {s}")
        mask_bts &= positions_bt[:, :, None] - window < positions_bt[:, None, :]
    elif window:
        mask_bts &= (jnp.arange(t)[:, None] - window < jnp.arange(s)[None, :])[None]
    if segment_ids_bt is not None:
        if s != t:
            raise ValueError(f"segment ids need self-attention; got query length {t} and key length {s}")
        same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        prompt_bts = (segment_ids_bt[:, None, :] == PROMPT_SEGMENT) & (segment_ids_bt[:, :, None] != 0)
        mask_bts &= same_bts | prompt_bts
    return mask_bts


def _attention_probs(q_bthd, k_bskd, *, segment_ids_bt=None, causal=True, window: int = 0, positions_bt=None):
    """softmax(q·kᵀ/√D + mask) in float32, grouped (B, K, G, T, S): query head k·G + g's weights on the keys.

    The step of `reference_attention` that holds the attention pattern; G = H/K query heads share K/V head k.
    """
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    q_btkgd = q_bthd.reshape(b, t, kv, h // kv, d)
    scores_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd,
                              preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    mask_bts = attention_mask(segment_ids_bt, b, t, s, causal, window, positions_bt)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, MASK_VALUE)
    return jax.nn.softmax(scores_bkgts, axis=-1)


def reference_attention(q_bthd, k_bskd, v_bskd, *, segment_ids_bt=None, causal=True, window: int = 0,
                        positions_bt=None, return_probs: bool = False):
    """softmax(q·kᵀ/√D + mask)·v, computed in float32 and returned in q's dtype.

    With `return_probs`, (output, weights): the float32 softmax weights (B, H, T, S) the output was made of.
    """
    b, t, h, d = q_bthd.shape
    probs_bkgts = _attention_probs(q_bthd, k_bskd, segment_ids_bt=segment_ids_bt, causal=causal, window=window,
                                   positions_bt=positions_bt)
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", probs_bkgts.astype(v_bskd.dtype), v_bskd,
                           preferred_element_type=jnp.float32)
    out_bthd = out_btkgd.reshape(b, t, h, d).astype(q_bthd.dtype)
    if return_probs:
        return out_bthd, probs_bkgts.reshape(b, h, t, k_bskd.shape[1])
    return out_bthd


def reference_decode_attention(q_bthd, k_cache_bksd, v_cache_bksd, lengths_b, window: int = 0):
    """Attention of a few new queries against a KV cache, the definition the decode kernels are tested against.

    q (B, Tq, H, D): the last Tq tokens of each row, already written into the cache; cache (B, K, S, D)
    (head-major, so a kernel's K/V block is contiguous);
    `lengths_b` (B,) counts each row's valid cache entries (new tokens included). Query t of row b sits at
    position lengths[b] - Tq + t and sees cache positions ≤ its own (and, with `window` W > 0, > its own − W).
    """
    check_window(window, True)
    b, tq, h, d = q_bthd.shape
    kv, s = k_cache_bksd.shape[1], k_cache_bksd.shape[2]
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    g = h // kv
    q_btkgd = q_bthd.reshape(b, tq, kv, g, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q_btkgd, k_cache_bksd,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    positions_bt = lengths_b[:, None] - tq + jnp.arange(tq)[None, :]
    visible_bts = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    if window:
        visible_bts &= jnp.arange(s)[None, None, :] > positions_bt[:, :, None] - window
    scores = jnp.where(visible_bts[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v_cache_bksd.dtype), v_cache_bksd,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q_bthd.dtype)
