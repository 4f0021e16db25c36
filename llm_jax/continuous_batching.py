"""Continuous batching: n prompts answered by `slots` rows decoding together, a freed row taking the next prompt.

`generate.generate` decodes a batch until its longest answer ends: with answers of mixed lengths (RL rollouts:
most short, a few up to `max_new_tokens`) most rows idle most of the time. Here one jitted program (a
`lax.while_loop`) keeps `slots` rows busy:

    slots free ─refill─▶ prompt j prefilled into the free slot's cache row (one (1, P) forward, written with
        dynamic_update_slice at the slot; several free slots are refilled one after another)
    ─emit─▶ every occupied slot samples its prompt's next token, scattered into the (n, N) outputs at
        [prompt, step]; a slot whose prompt stops (a stop id, or its max_new_tokens-th token) is freed
    ─decode─▶ one token per slot through the cache (positions = each row's own cache length) ─▶ refill ─▶ ...

until every prompt has stopped. A freed slot's stale cache entries past its new prompt are never attended to
(attention reads a row up to its own length) and are overwritten as the new answer grows; a slot with nothing
left to answer keeps decoding in step with the others (its length frozen, its tokens dropped).

Results do not depend on the schedule: prompt j's token i is drawn with `token_keys(rng, j, i)`, which
`generate(..., row_keys=True)` uses for row j too, so both give the same tokens, log-probs (up to float
rounding of batched against one-row matmuls), mask and lengths. Sampling, stopping and `log_probs` are the
static generator's (`generate.py`). The slots' rows shard over the batch axes like the static generator's.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.generate import (Generation, SamplingConfig, cache_length, check_prompts, constrain_cache,
                              decode_step, is_stop, prefill, sample_rows, token_keys)
from llm_jax.model.transformer import KVCache, Transformer

FREE = -1  # `prompt_s` of a slot that holds no prompt


class _Slots(NamedTuple):
    prompt_s: jax.Array   # (S,) int32 index of the prompt the slot answers; FREE when none
    step_s: jax.Array     # (S,) int32 index of the slot's next token in its answer
    token_s: jax.Array    # (S,) int32 the token emitted last, fed at the next decode step
    logits_sv: jax.Array  # (S, V) float32 logits of each slot's next token
    cache: KVCache        # (L, S, K, max_len, D) keys and values, lengths (S,)
    next_prompt: jax.Array  # () int32 the first prompt not yet given a slot
    finished: jax.Array     # () int32 prompts answered


def make_continuous_generate_fn(model: Transformer, sampling: SamplingConfig, prompt_len: int, slots: int):
    """A jittable (params, prompt_tokens (n, P), prompt_lengths (n,), rng) -> Generation of the n prompts."""
    cfg, n_new = model.cfg, sampling.max_new_tokens
    max_len = cache_length(prompt_len, n_new, cfg.prompt_tuning_tokens)

    def by_slot(x, *axes):
        return sharding.constrain(x, ("batch", *axes), model.mesh, model.rules)

    def placed(st: _Slots) -> _Slots:
        """The slot state with its rows over the batch axes, so every iteration of the loop keeps one layout."""
        return st._replace(prompt_s=by_slot(st.prompt_s), step_s=by_slot(st.step_s), token_s=by_slot(st.token_s),
                           logits_sv=by_slot(st.logits_sv, "act_vocab"),
                           cache=constrain_cache(model, st.cache)._replace(lengths=by_slot(st.cache.lengths)))

    def continuous_generate_fn(params, prompt_tokens_np, prompt_lengths_n, rng):
        n = prompt_tokens_np.shape[0]

        def refill_one(st: _Slots) -> _Slots:
            """Prefills the next waiting prompt into the first free slot."""
            slot, j = jnp.argmax(st.prompt_s == FREE).astype(jnp.int32), st.next_prompt
            tokens_1p = jax.lax.dynamic_slice_in_dim(prompt_tokens_np, j, 1, axis=0)
            length_1 = jax.lax.dynamic_slice_in_dim(prompt_lengths_n, j, 1)
            # row: (L, 1, K, S + P, D) with a soft prompt of S tokens first; its length counts them
            logits_1v, row = prefill(model, params, tokens_1p, length_1, cfg.prompt_tuning_tokens + prompt_len)
            at_slot = (0, slot, 0, 0, 0)
            cache = KVCache(jax.lax.dynamic_update_slice(st.cache.k, row.k, at_slot),
                            jax.lax.dynamic_update_slice(st.cache.v, row.v, at_slot),
                            jax.lax.dynamic_update_slice(st.cache.lengths, row.lengths, (slot,)))
            set_at = functools.partial(jax.lax.dynamic_update_slice, start_indices=(slot,))
            return placed(st._replace(
                prompt_s=set_at(st.prompt_s, j[None]), step_s=set_at(st.step_s, jnp.zeros((1,), jnp.int32)),
                logits_sv=jax.lax.dynamic_update_slice(st.logits_sv, logits_1v, (slot, 0)), cache=cache,
                next_prompt=j + 1))

        def refill(st: _Slots) -> _Slots:
            return jax.lax.while_loop(lambda st: jnp.any(st.prompt_s == FREE) & (st.next_prompt < n), refill_one, st)

        def emit(st: _Slots, out: Generation):
            """Each occupied slot samples its next token into out[prompt, step]; stopped prompts free their slot."""
            occupied_s = st.prompt_s != FREE
            keys_s = token_keys(rng, jnp.maximum(st.prompt_s, 0), st.step_s)
            tokens_s, log_probs_s = sample_rows(st.logits_sv, keys_s, sampling)
            row_s = jnp.where(occupied_s, st.prompt_s, n)  # row n is out of range: the write is dropped
            out = Generation(out.tokens.at[row_s, st.step_s].set(tokens_s, mode="drop"),
                             out.log_probs.at[row_s, st.step_s].set(log_probs_s, mode="drop"),
                             out.mask.at[row_s, st.step_s].set(1.0, mode="drop"),
                             out.lengths.at[row_s].add(1, mode="drop"))
            stopped_s = occupied_s & (is_stop(tokens_s, sampling.stop_ids) | (st.step_s + 1 >= n_new))
            st = st._replace(prompt_s=jnp.where(stopped_s, FREE, st.prompt_s), step_s=st.step_s + 1,
                             token_s=tokens_s, finished=st.finished + jnp.sum(stopped_s, dtype=jnp.int32))
            return placed(st), out

        def decode(st: _Slots) -> _Slots:
            logits_sv, cache = decode_step(model, params, st.cache, st.token_s)
            # A free slot's write lands at its frozen length, inside its row; its logits are never sampled.
            lengths_s = jnp.where(st.prompt_s != FREE, cache.lengths, st.cache.lengths)
            return placed(st._replace(logits_sv=logits_sv, cache=cache._replace(lengths=lengths_s)))

        zeros_s = jnp.zeros((slots,), jnp.int32)
        st = placed(_Slots(prompt_s=jnp.full((slots,), FREE, jnp.int32), step_s=zeros_s, token_s=zeros_s,
                           logits_sv=jnp.zeros((slots, cfg.vocab_size), jnp.float32),
                           cache=KVCache.zeros(cfg, slots, max_len), next_prompt=jnp.int32(0),
                           finished=jnp.int32(0)))
        out = Generation(jnp.zeros((n, n_new), jnp.int32), jnp.zeros((n, n_new), jnp.float32),
                         jnp.zeros((n, n_new), jnp.float32), jnp.zeros((n,), jnp.int32))
        st, out = emit(refill(st), out)

        def body(carry):
            st, out = carry
            return emit(refill(decode(st)), out)

        return jax.lax.while_loop(lambda carry: carry[0].finished < n, body, (st, out))[1]

    return continuous_generate_fn


@functools.lru_cache(maxsize=16)
def _jitted(model: Transformer, sampling: SamplingConfig, prompt_len: int, slots: int):
    return jax.jit(make_continuous_generate_fn(model, sampling, prompt_len, slots))


def generate_continuous(model: Transformer, params, prompt_tokens_np, prompt_lengths_n, rng,
                        sampling: SamplingConfig, *, slots: int) -> Generation:
    """Answers n right-padded prompts (n, P) with `slots` rows decoding at a time; rows in prompt order.

    More slots than prompts would only decode empty rows: min(slots, n) are used. One compilation serves every
    call of the same (n, P), sampling and slot count."""
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
        raise ValueError(f"slots must be an integer ≥ 1, got {slots!r}")
    check_prompts(prompt_tokens_np, prompt_lengths_n, model.cfg.vocab_size)
    n, p = np.shape(prompt_tokens_np)
    fn = _jitted(model, sampling, int(p), min(int(slots), int(n)))
    return fn(params, jnp.asarray(prompt_tokens_np, jnp.int32), jnp.asarray(prompt_lengths_n, jnp.int32), rng)
