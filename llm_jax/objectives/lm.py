"""Next-token language modelling: pretraining, continued pretraining and (with a response mask) SFT.

Batches are packed rows (see `llm_jax/data/packing.py`): inputs, targets, positions, segment_ids and a
loss_mask that is 1 where the target counts (every real token when pretraining, response tokens only in SFT).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from llm_jax.data.mixture import build_lm_data
from llm_jax.model.transformer import Transformer, dropout_rngs
from llm_jax.objectives import fmt
from llm_jax.train import step as train_step

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")  # every (B, T) array of a batch


@jax.custom_vjp
def _log_softmax_at(logits_btv, targets_bt):
    return _log_softmax_at_fwd(logits_btv, targets_bt)[0]


def _target_and_other_max(logits_btv, targets_bt):
    """(z[target], max over the other tokens of z), the latter −inf with a one-token vocabulary.

    The loss and `argmax_hits` both take them with this one function on the same f32 logits, so under jit XLA
    computes them once (common-subexpression elimination): the accuracy costs no pass of its own.
    """
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    vocab_v = jax.lax.broadcasted_iota(targets_bt.dtype, logits_btv.shape, logits_btv.ndim - 1)
    others_btv = jnp.where(vocab_v == targets_bt[..., None], -jnp.inf, logits_btv)
    return target_logit_bt, jnp.max(others_btv, axis=-1)


def _log_softmax_at_fwd(logits_btv, targets_bt):
    # max(z[y], max of the others) is exactly max(z): the softmax shift is unchanged, and it shares its pass
    # with the accuracy's strict comparison.
    target_logit_bt, other_max_bt = _target_and_other_max(logits_btv, targets_bt)
    max_bt = jnp.maximum(target_logit_bt, other_max_bt)
    lse_bt = max_bt + jnp.log(jnp.sum(jnp.exp(logits_btv - max_bt[..., None]), axis=-1))
    return target_logit_bt - lse_bt, (logits_btv, targets_bt, lse_bt)


def _log_softmax_at_bwd(residuals, g_bt):
    # d/dz_v [z_y − lse(z)] = 1[v = y] − softmax(z)_v: one elementwise pass over the logits, where autodiff
    # would write a scattered one-hot (a zeroed (B, T, V) buffer) and a separately saved exp(z − max).
    logits_btv, targets_bt, lse_bt = residuals
    vocab_v = jax.lax.broadcasted_iota(targets_bt.dtype, logits_btv.shape, logits_btv.ndim - 1)
    onehot_btv = (vocab_v == targets_bt[..., None]).astype(logits_btv.dtype)
    return g_bt[..., None] * (onehot_btv - jnp.exp(logits_btv - lse_bt[..., None])), None


_log_softmax_at.defvjp(_log_softmax_at_fwd, _log_softmax_at_bwd)


def token_log_probs(logits_btv, targets_bt):
    """log p(target_t | context) = logits[target] − logsumexp(logits), in float32."""
    return _log_softmax_at(logits_btv.astype(jnp.float32), targets_bt)


def argmax_hits(logits_btv, targets_bt):
    """1 where the target's logit is strictly larger than every other token's, else 0.

    An exact tie with another token is a miss: a collapsed model whose logits are all equal predicts nothing,
    and must not score accuracy 1.0. (`argmax(logits) == target` would instead count a tie as a hit when the
    target happens to have the lowest index.) The comparison is against the max over the other tokens, which
    the loss's forward takes with the same function (`_target_and_other_max`), so it costs no extra pass over
    the (B, T, V) logits, where `jnp.argmax`'s (value, index) reduction was a separate pass that took about 5%
    of a CPU train step at the `bench` shape. The f32 cast matches `token_log_probs` so the two are one
    computation; it is exact, so the comparison is the same as in the logits' own dtype.
    """
    target_logit_bt, other_max_bt = _target_and_other_max(logits_btv.astype(jnp.float32), targets_bt)
    return target_logit_bt > other_max_bt


def cross_entropy(logits_btv, targets_bt, loss_mask_bt):
    """Masked next-token cross entropy as a sum, with the count it is summed over.

        loss_sum = Σ_{b,t} m_bt · (logsumexp_v z_btv − z_bt[y_bt]),   weight = Σ_{b,t} m_bt
    The mean loss is loss_sum / weight (nats per predicted token).
    """
    mask = loss_mask_bt.astype(jnp.float32)
    return -jnp.sum(token_log_probs(logits_btv, targets_bt) * mask), jnp.sum(mask)


def make_loss_fn(model: Transformer):
    def loss_fn(params, batch, rng):
        logits_btv = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                 method=Transformer.logits, rngs=dropout_rngs(rng))  # LoRA dropout, if any
        loss_sum, weight = cross_entropy(logits_btv, batch["targets"], batch["loss_mask"])
        correct = jnp.sum(argmax_hits(logits_btv, batch["targets"]) * batch["loss_mask"])
        return loss_sum, {"weight": weight, "accuracy": correct.astype(jnp.float32)}
    return loss_fn


def abstract_batch(config) -> dict:
    """One global train batch as shapes and dtypes, (data.batch_size, data.seq_len) per key, as the data gives
    it: what `llm-jax memory` compiles the step for without reading any data (train/memory.py)."""
    shape = (config.data.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}


def make_train_step(config, model: Transformer, optimizer, schedule):
    return train_step.make_train_step(make_loss_fn(model), optimizer, schedule, config.optim.grad_accum)


def make_eval_step(config, model: Transformer):
    del config
    return train_step.make_eval_step(make_loss_fn(model))


def finish_eval(metrics: dict) -> dict:
    """Per-token eval means -> reported metrics: adds perplexity."""
    return {**metrics, "eval_perplexity": math.exp(min(metrics["eval_loss"], 80.0))}


def table_row(metrics: dict, summary: dict) -> str:
    del summary
    return f"held-out perplexity {fmt(metrics.get('eval_perplexity'), '.2f')}, loss {fmt(metrics.get('eval_loss'))}"


def build_data(config, tokenizer, workdir: str):
    """Packed, shuffled, per-process batches of the training corpus plus fixed held-out batches; with
    `data.mixture`, the components' rows mixed by weight and each component's held-out rows an eval set of its own."""
    return build_lm_data(config.data, tokenizer, cache_dir=config.data.cache_dir or os.path.join(workdir, "data"),
                         seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
