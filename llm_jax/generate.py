"""Generation: prefill the prompts into a KV cache, then decode one token per step, all in one jitted program.

    prompts (B, P) right-padded, lengths (B,) ─prefill─▶ cache + logits at each row's last prompt token
        ─sample─▶ token 0 ─decode step (1 token, cache attention)─▶ token 1 ─ ... ─▶ (B, N) new tokens

Rows of different prompt lengths share one batch: row b's prompt is its first lengths[b] tokens; its padding
is written into the cache but never attended to, and decoding overwrites it from position lengths[b] on.
A model with a soft prompt (prompt tuning, model/prompt_tuning.py) holds it in the cache too: the cache is P
entries longer, prefill writes them first, and the cache's lengths count them.

Sampling: greedy (`temperature=0`), or temperature with optional top-k and top-p (nucleus) filtering. A row
stops after emitting one of `stop_ids` (the stop token is kept, with mask 1: PPO scores the decision to stop)
or after `max_new_tokens`; the loop ends when every row has stopped. `log_probs` are the log-probabilities of
the emitted tokens under the tempered distribution softmax(logits / temperature) before top-k/top-p
filtering (temperature 1 when greedy): the behaviour policy's log-probs that PPO's ratio and KL need.
Token i of all rows is drawn with key i of `split(rng, max_new_tokens)`; with `row_keys=True`, row b's token i
with its own key `token_keys(rng, b, i)`, the key `continuous_batching.generate_continuous` gives prompt b's
token i, so both generators sample the same tokens from the same rng whatever the slot schedule.

`make_full_forward_generate_fn` is the same sampler without a cache (the whole sequence re-run every step): the
reference the cache is tested against and the baseline of `experiments/benchmarks/generation.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.model.transformer import KVCache, Transformer

CACHE_MULTIPLE = 128  # cache lengths are rounded up to this, a multiple of every decode kernel's block


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
    tokens: jax.Array     # (B, N) int32 new tokens; 0 (pad) after a row stops
    log_probs: jax.Array  # (B, N) float32, 0 where mask is 0
    mask: jax.Array       # (B, N) float32, 1 on emitted tokens (the stop token included)
    lengths: jax.Array    # (B,) int32 number of emitted tokens


def sample(logits_bv, rng, sampling: SamplingConfig):
    """(tokens (B,), log-probs (B,)) from f32 logits; see the module docstring for which log-probs."""
    if sampling.temperature == 0.0:
        tokens_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        log_probs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    else:
        scaled_bv = logits_bv / sampling.temperature
        log_probs_bv = jax.nn.log_softmax(scaled_bv, axis=-1)
        filtered_bv = scaled_bv
        if sampling.top_k:
            kth_b1 = jax.lax.top_k(scaled_bv, min(sampling.top_k, scaled_bv.shape[-1]))[0][:, -1:]
            filtered_bv = jnp.where(scaled_bv < kth_b1, -jnp.inf, filtered_bv)
        if sampling.top_p < 1.0:
            # Keep the most likely tokens until their mass reaches top_p (the token that crosses it is kept).
            sorted_bv = jnp.sort(filtered_bv, axis=-1)[:, ::-1]
            probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
            mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
            kept_bv = mass_before_bv < sampling.top_p
            threshold_b1 = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
            filtered_bv = jnp.where(filtered_bv < threshold_b1, -jnp.inf, filtered_bv)
        tokens_b = jax.random.categorical(rng, filtered_bv, axis=-1).astype(jnp.int32)
    return tokens_b, jnp.take_along_axis(log_probs_bv, tokens_b[:, None], axis=-1)[:, 0]


def token_keys(rng, rows_b, steps_b):
    """The key of each row's token: fold_in(fold_in(rng, row), step), a function of (rng, row, step) only."""
    return jax.vmap(lambda row, step: jax.random.fold_in(jax.random.fold_in(rng, row), step))(rows_b, steps_b)


def sample_rows(logits_bv, keys_b, sampling: SamplingConfig):
    """`sample` with a key per row: row b's draw depends on its logits and keys[b] only, not on its neighbours."""
    tokens_b1, log_probs_b1 = jax.vmap(lambda logits_v, key: sample(logits_v[None], key, sampling))(logits_bv, keys_b)
    return tokens_b1[:, 0], log_probs_b1[:, 0]


def is_stop(tokens_b, stop_ids: Sequence[int]):
    stop = jnp.zeros(tokens_b.shape, bool)
    for i in stop_ids:
        stop |= tokens_b == i
    return stop


def _decode_loop(first_logits_bv, rng, sampling: SamplingConfig, step_fn, state, row_keys: bool = False):
    """Samples token 0 from `first_logits`, then token i from step_fn(state, token i-1) -> (logits, state).

    Token i of every row is drawn with key i of `split(rng, max_new_tokens)`, or with `row_keys` with its own key
    `token_keys(rng, row, i)` (the keys of `continuous_batching`, so both give the same tokens)."""
    b, n = first_logits_bv.shape[0], sampling.max_new_tokens
    out = Generation(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32),
                     jnp.zeros((b, n), jnp.float32), jnp.zeros((b,), jnp.int32))

    def emit(i, logits_bv, key, done_b, out):
        if row_keys:
            keys_b = token_keys(rng, jnp.arange(b, dtype=jnp.int32), jnp.full((b,), i, jnp.int32))
            tokens_b, log_probs_b = sample_rows(logits_bv, keys_b, sampling)
        else:
            tokens_b, log_probs_b = sample(logits_bv, key, sampling)
        live_b = jnp.logical_not(done_b)
        tokens_b = jnp.where(live_b, tokens_b, 0)
        out = Generation(out.tokens.at[:, i].set(tokens_b),
                         out.log_probs.at[:, i].set(jnp.where(live_b, log_probs_b, 0.0)),
                         out.mask.at[:, i].set(live_b.astype(jnp.float32)),
                         out.lengths + live_b.astype(jnp.int32))
        return tokens_b, done_b | (live_b & is_stop(tokens_b, sampling.stop_ids)), out

    keys = jax.random.split(rng, n)
    tokens_b, done_b, out = emit(0, first_logits_bv, keys[0], jnp.zeros((b,), bool), out)

    def cond(carry):
        i, _, done_b, _, _ = carry
        return (i < n) & jnp.logical_not(jnp.all(done_b))

    def body(carry):
        i, tokens_b, done_b, state, out = carry
        logits_bv, state = step_fn(state, tokens_b, i)
        tokens_b, done_b, out = emit(i, logits_bv, keys[i], done_b, out)
        return i + 1, tokens_b, done_b, state, out

    return jax.lax.while_loop(cond, body, (jnp.int32(1), tokens_b, done_b, state, out))[-1]


def check_prompts(prompt_tokens_bp, prompt_lengths_b, vocab_size: int):
    tokens, lengths = np.asarray(prompt_tokens_bp), np.asarray(prompt_lengths_b)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"prompts must be (B, P) with lengths (B,); got {tokens.shape} and {lengths.shape}")
    if tokens.shape[0] == 0:
        raise ValueError(f"no prompts to generate from: prompt tokens have shape {tokens.shape}")
    if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
        raise ValueError(f"prompt lengths must be in [1, {tokens.shape[1]}], got {lengths.min()}..{lengths.max()}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")


def cache_length(prompt_len: int, max_new_tokens: int, soft_prompt: int = 0) -> int:
    """Cache entries for a soft prompt of `soft_prompt` tokens, the prompt and the new tokens, rounded up."""
    return -(-(soft_prompt + prompt_len + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE


def constrain_cache(model: Transformer, cache: KVCache) -> KVCache:
    """Rows of the cache over the batch axes, heads over the tensor axes, as the decode kernel reads them."""
    return cache._replace(**{name: sharding.constrain(getattr(cache, name),
                                                      ("layers", "batch", "act_kv_heads", None, None),
                                                      model.mesh, model.rules) for name in ("k", "v")})


def prefill(model: Transformer, params, prompt_tokens_bp, prompt_lengths_b, max_len: int):
    """(logits (B, V) of each row's first new token, cache (B rows of `max_len`) holding the prompts, after the
    model's soft prompt where it has one: `max_len` counts it, and so do the cache's lengths)."""
    b, p = prompt_tokens_bp.shape
    cache = KVCache.zeros(model.cfg, b, max_len)._replace(lengths=prompt_lengths_b.astype(jnp.int32))
    cache = constrain_cache(model, cache)
    segment_ids_bp = (jnp.arange(p)[None, :] < prompt_lengths_b[:, None]).astype(jnp.int32)
    hidden_bpd, cache = model.apply(params, prompt_tokens_bp, segment_ids_bt=segment_ids_bp, cache=cache,
                                    prefill=True)
    last_b1d = jnp.take_along_axis(hidden_bpd, (prompt_lengths_b - 1)[:, None, None], axis=1)
    return model.apply(params, last_b1d, method=Transformer.head)[:, 0], cache


def decode_step(model: Transformer, params, cache: KVCache, tokens_b):
    """Feeds one token per row at its cache length: (logits (B, V) of the next token, updated cache)."""
    hidden_b1d, cache = model.apply(params, tokens_b[:, None], cache=cache)
    return model.apply(params, hidden_b1d, method=Transformer.head)[:, 0], cache


def make_generate_fn(model: Transformer, sampling: SamplingConfig, prompt_len: int, row_keys: bool = False):
    """A jittable (params, prompt_tokens (B, P), prompt_lengths (B,), rng) -> Generation using the cache."""
    max_len = cache_length(prompt_len, sampling.max_new_tokens, model.cfg.prompt_tuning_tokens)

    def generate_fn(params, prompt_tokens_bp, prompt_lengths_b, rng):
        first_logits_bv, cache = prefill(model, params, prompt_tokens_bp, prompt_lengths_b, max_len)

        def step(cache, tokens_b, i):
            del i
            return decode_step(model, params, cache, tokens_b)

        return _decode_loop(first_logits_bv, rng, sampling, step, cache, row_keys)

    return generate_fn


def make_full_forward_generate_fn(model: Transformer, sampling: SamplingConfig, prompt_len: int,
                                  row_keys: bool = False):
    """The same sampler re-running the whole sequence every step (no cache): the reference and the baseline."""
    total = prompt_len + sampling.max_new_tokens

    def generate_fn(params, prompt_tokens_bp, prompt_lengths_b, rng):
        b = prompt_tokens_bp.shape[0]
        seq_bt = jnp.zeros((b, total), jnp.int32).at[:, :prompt_len].set(prompt_tokens_bp)

        def logits_at(seq_bt, last_b):
            # causal: tokens after each row's position (its padding, future slots) cannot change its logits
            hidden_btd = model.apply(params, seq_bt)
            last_b1d = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)
            return model.apply(params, last_b1d, method=Transformer.head)[:, 0]

        def step(seq_bt, tokens_b, i):
            position_b = prompt_lengths_b + i - 1  # where token i-1 goes
            seq_bt = jax.vmap(lambda row, tok, pos: row.at[pos].set(tok))(seq_bt, tokens_b, position_b)
            return logits_at(seq_bt, position_b), seq_bt

        return _decode_loop(logits_at(seq_bt, prompt_lengths_b - 1), rng, sampling, step, seq_bt, row_keys)

    return generate_fn


@functools.lru_cache(maxsize=16)
def _jitted(model: Transformer, sampling: SamplingConfig, prompt_len: int, use_cache: bool, row_keys: bool):
    make = make_generate_fn if use_cache else make_full_forward_generate_fn
    return jax.jit(make(model, sampling, prompt_len, row_keys))


def generate(model: Transformer, params, prompt_tokens_bp, prompt_lengths_b, rng, sampling: SamplingConfig,
             *, use_cache: bool = True, row_keys: bool = False) -> Generation:
    """Samples up to `sampling.max_new_tokens` tokens after each row's prompt; see the module docstring.

    `row_keys`: draw row b's token i with `token_keys(rng, b, i)`, as `continuous_batching.generate_continuous`
    draws prompt b's, so both give the same tokens for the same rng (off: one key per step for all rows)."""
    check_prompts(prompt_tokens_bp, prompt_lengths_b, model.cfg.vocab_size)
    fn = _jitted(model, sampling, int(np.shape(prompt_tokens_bp)[1]), use_cache, row_keys)
    return fn(params, jnp.asarray(prompt_tokens_bp, jnp.int32), jnp.asarray(prompt_lengths_b, jnp.int32), rng)
