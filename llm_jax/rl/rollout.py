"""Rollouts: prompts and sampled responses laid out as whole sequences, and what each model reads from them.

A batch of B prompts (right-padded (B, P), row b's prompt its first p_b tokens) and their responses from
`generate.generate` ((B, N) tokens, mask, n_b tokens each) become one right-padded sequence per row:

    sequence_bl[b] = prompt_b[:p_b] ++ response_b[:n_b] ++ padding,     L = P + N
    segment_ids_bl = 1 on those p_b + n_b tokens, 0 after

Response token i of row b sits at position p_b + i; the model's distribution over it is read at the position
before, `index_bn[b, i] = p_b + i − 1`. Everything the PPO losses see is in response coordinates (B, N):
log-probs of the sampled tokens under the policy and the reference, the value of the state before each
token, and the per-token mask. The reward model reads the whole sequence (`reward.RewardModel.score`): at its
last real token, which is the end marker when the response stopped.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llm_jax.model.transformer import Transformer, dropout_rngs
from llm_jax.objectives.lm import token_log_probs
from llm_jax.objectives.reward import RewardModel


class Sequences(NamedTuple):
    """A rollout's model inputs: whole sequences (B, L) and where the response tokens are (B, N)."""
    tokens_bl: jax.Array       # int32 prompt ++ response ++ 0 padding
    segment_ids_bl: jax.Array  # int32 1 on real tokens
    index_bn: jax.Array        # int32 position whose output predicts response token i
    response_bn: jax.Array     # int32 the sampled tokens (0 after a row stops)
    mask_bn: jax.Array         # float32 1 on emitted tokens (the stop token included)


def assemble(prompt_tokens_bp, prompt_lengths_b, response_bn, mask_bn) -> Sequences:
    """Lays each prompt's response right after its last real token (module docstring)."""
    b, p = prompt_tokens_bp.shape
    n = response_bn.shape[1]
    tokens_bl = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt_tokens_bp)
    # Writing the response at p_b overwrites the prompt's own padding; the write is a dynamic slice per row.
    tokens_bl = jax.vmap(lambda row, resp, start: jax.lax.dynamic_update_slice(row, resp, (start,)))(
        tokens_bl, response_bn.astype(jnp.int32), prompt_lengths_b)
    n_b = jnp.sum(mask_bn, axis=1).astype(jnp.int32)
    segment_ids_bl = (jnp.arange(p + n)[None, :] < (prompt_lengths_b + n_b)[:, None]).astype(jnp.int32)
    index_bn = jnp.minimum(prompt_lengths_b[:, None] - 1 + jnp.arange(n)[None, :], p + n - 1)
    return Sequences(tokens_bl, segment_ids_bl, index_bn.astype(jnp.int32), response_bn.astype(jnp.int32),
                     mask_bn.astype(jnp.float32))


def positions(segment_ids_bl):
    return jnp.broadcast_to(jnp.arange(segment_ids_bl.shape[1]), segment_ids_bl.shape)


def _hidden_at(model, params, seqs: Sequences, rng=None):
    """Final hidden states (B, N, D) at the positions predicting each response token."""
    hidden_bld = model.apply(params, seqs.tokens_bl, positions(seqs.segment_ids_bl), seqs.segment_ids_bl,
                             rngs=dropout_rngs(rng))
    return jnp.take_along_axis(hidden_bld, seqs.index_bn[..., None], axis=1)


def response_logits(model: Transformer, params, seqs: Sequences, rng=None):
    """(B, N, V) f32 logits of the distributions the response tokens were drawn from. The head runs on the
    N response positions only, not on the prompt's."""
    return model.apply(params, _hidden_at(model, params, seqs, rng), method=Transformer.head)


def response_log_probs(model: Transformer, params, seqs: Sequences, rng=None):
    """(B, N) log π(response token i | prompt, tokens < i); 0 where the mask is 0."""
    return token_log_probs(response_logits(model, params, seqs, rng), seqs.response_bn) * seqs.mask_bn


def values(model: RewardModel, params, seqs: Sequences, rng=None):
    """(B, N) V(state before response token i) = w · h + b of the value model's scalar head; 0 on padding."""
    h_bnd = _hidden_at(model, params, seqs, rng).astype(jnp.float32)
    p = params["params"]
    return (h_bnd @ p["reward_head"].astype(jnp.float32) + p["reward_bias"].astype(jnp.float32)) * seqs.mask_bn


def reward_scores(model: RewardModel, params, seqs: Sequences, readout: str):
    """(B,) reward-model scores of the whole sequences, read as the reward model was trained to read them."""
    head_b, terms_bn = reward_terms(model, params, seqs, readout)
    return head_b + jnp.sum(terms_bn, axis=1)


def reward_terms(model: RewardModel, params, seqs: Sequences, readout: str):
    """The reward model's score in parts, (head_b, terms_bn) with score = head_b + Σ_i terms_bn: terms_bn[b, i]
    is the part that response token i carries (its log-likelihood under the reward model's LM head for readout
    "likelihood"; 0 for "last" and on padding)."""
    targets_bl = jnp.pad(seqs.tokens_bl[:, 1:], ((0, 0), (0, 1)))
    # The answer mask over targets: the response tokens, predicted from positions index_bn.
    answer_bl = jnp.zeros(seqs.tokens_bl.shape, jnp.float32)
    answer_bl = jax.vmap(lambda row, idx, m: row.at[idx].max(m))(answer_bl, seqs.index_bn, seqs.mask_bn)
    head_b, terms_bl = model.apply(params, seqs.tokens_bl, positions(seqs.segment_ids_bl), seqs.segment_ids_bl,
                                   targets_bl, answer_bl, readout=readout, method=RewardModel.score_terms)
    return head_b, jnp.take_along_axis(terms_bl, seqs.index_bn, axis=1) * seqs.mask_bn
