"""The train state and its shardings, created directly sharded (no replica of the model is ever built).

`params` always holds every param; `opt_state` only covers the params the optimizer trains (all of them, or with
LoRA the adapters and heads: `train.optimizer.trainable_of`), so frozen weights cost no optimizer memory.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from llm_jax import sharding
from llm_jax.model import lora, prompt_tuning
from llm_jax.train.optimizer import trainable_of


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # scalar int32: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array         # base key; step k uses fold_in(rng, k), so resuming needs no rng bookkeeping


def partition(params, trainable) -> tuple[Any, Any]:
    """(trainable, frozen) params for a rule or mask (see `lora.split`); (params, None) when all train."""
    mask = lora.mask_of(trainable, params)
    if mask is None:
        return params, None
    picked, frozen = lora.split(params, mask)
    if not jax.tree.leaves(picked):
        raise ValueError("the trainable mask selects no parameter: nothing would train")
    return picked, frozen


def state_shardings(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings). `init_params(key)` returns boxed (logically partitioned) params."""
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    param_shardings = sharding.tree_shardings(sharding.param_logical_specs(boxed), mesh, rules)
    abstract_params = nn.unbox(boxed)
    mask = lora.mask_of(trainable_of(optimizer), abstract_params)
    trained_params, _ = partition(abstract_params, mask)
    trained_shardings, _ = partition(param_shardings, mask)
    abstract_opt = jax.eval_shape(optimizer.init, trained_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, trained_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def _overlay(given, fresh):
    """`fresh` with every leaf that `given` has replaced by given's: params restored from a plain model fill a
    LoRA model's base, and its adapters keep their fresh init."""
    if not (isinstance(given, Mapping) and isinstance(fresh, Mapping)):
        return given
    unknown = set(given) - set(fresh)
    if unknown:
        raise ValueError(f"params to start from have entries the model lacks: {sorted(map(str, unknown))}")
    return {key: _overlay(given[key], value) if key in given else value for key, value in fresh.items()}


def create_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                 shardings: TrainState, seed: int, params=None) -> TrainState:
    """A fresh state; `params` (already sharded) replaces the random init, as when starting from a run. They
    may hold a part of the model's params (a LoRA model's base, `lora.without_adapters`): the rest is fresh,
    and a fresh soft prompt is drawn from the given embedding table (`prompt_tuning.from_given_vocab`)."""
    partial = params is not None and jax.tree.structure(params) != jax.tree.structure(shardings.params)

    def build(key, p):
        init_key, state_key = jax.random.split(key)
        if p is None:
            p = nn.unbox(init_params(init_key))
        elif partial:  # the fresh values of the given leaves are dead code, which XLA drops
            prompt_key = jax.random.fold_in(init_key, 1)
            p = prompt_tuning.from_given_vocab(_overlay(p, nn.unbox(init_params(init_key))), p, prompt_key)
        trained, _ = partition(p, trainable_of(optimizer))
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(trained),
                          rng=state_key)
    # Raw uint32 keys (not typed key arrays) so the rng checkpoints like any other array.
    key = jax.random.PRNGKey(seed)
    if params is None:
        return jax.jit(lambda k: build(k, None), out_shardings=shardings)(key)
    return jax.jit(build, out_shardings=shardings, donate_argnums=1)(key, params)
