"""The shared train and eval steps: gradient accumulation and the optimizer update around any objective.

An objective supplies `loss_fn(params, batch, rng) -> (loss_sum, stats)` where `stats["weight"]` is what the
loss is summed over (tokens for a language model, pairs for a reward model) and every other entry of
`stats` is also a sum. Sums over micro-batches divided by the total weight give exactly the full-batch
mean, whatever the split, so gradient accumulation never changes the objective.

The `rng` is a fresh key per step (and micro-batch) in training and None in evaluation, so a model with
dropout (LoRA's) takes `rngs=transformer.dropout_rngs(rng)` and is deterministic when evaluated.

Only the params the optimizer trains (`train.optimizer.trainable_of`: all, or LoRA's adapters and heads) are
differentiated; the frozen rest is closed over as constants and passes through the step unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from llm_jax.model import lora
from llm_jax.train.optimizer import trainable_of
from llm_jax.train.state import TrainState, partition

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def split_micro_batches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B/n, ...). Micro-batch i takes every n-th row, so each device keeps its own rows."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _summed_loss_and_grads(loss_fn: LossFn, params, batch: dict, rng, grad_accum: int):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss_sum, stats), grads = grad_fn(params, batch, rng)
        return loss_sum, stats, grads

    def micro_step(carry, micro):
        index, micro_batch = micro
        (loss_sum, stats), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss_sum, stats, grads)), None

    micro_batches = split_micro_batches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating)
                                             else x.dtype),
                         jax.eval_shape(grad_fn, params, first, rng))
    (loss_sum, stats), grads = zeros
    (loss_sum, stats, grads), _ = jax.lax.scan(micro_step, (loss_sum, stats, grads),
                                               (jnp.arange(grad_accum), micro_batches))
    return loss_sum, stats, grads


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1, trainable=None):
    """`step(state, batch) -> (state, metrics)`: pure; the caller jits it with shardings and donation.

    `trainable` (a rule params -> bool mask, or a mask) overrides the optimizer's choice of params to train;
    it must be the one the optimizer state was built for."""
    trainable = trainable_of(optimizer) if trainable is None else trainable

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        trained, frozen = partition(state.params, trainable)
        if frozen is None:
            trained_loss_fn = loss_fn
        else:
            def trained_loss_fn(p, b, r):
                return loss_fn(lora.combine(p, frozen), b, r)
        loss_sum, stats, grads = _summed_loss_and_grads(trained_loss_fn, trained, batch, rng, grad_accum)
        weight = jnp.maximum(stats["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        params = trained if frozen is None else lora.combine(trained, frozen)
        metrics = {name: value / weight for name, value in stats.items() if name != "weight"}
        metrics.update(loss=loss_sum / weight, weight=stats["weight"], grad_norm=optax.tree.norm(grads),
                       lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return step


def make_eval_step(loss_fn: LossFn):
    """`eval_step(params, batch) -> sums`: the caller adds sums over batches and divides by the weight."""
    def eval_step(params, batch: dict):
        loss_sum, stats = loss_fn(params, batch, None)  # no rng: deterministic (no dropout)
        return {**stats, "loss": loss_sum}
    return eval_step
