"""The train state and its shardings, created directly sharded (no replica of the model is ever built)."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from llm_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # scalar int32: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array         # base key; step k uses fold_in(rng, k), so resuming needs no rng bookkeeping


def state_shardings(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings). `init_params(key)` returns boxed (logically partitioned) params."""
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    param_shardings = sharding.tree_shardings(sharding.param_logical_specs(boxed), mesh, rules)
    abstract_params = nn.unbox(boxed)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def create_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                 shardings: TrainState, seed: int, params=None) -> TrainState:
    """A fresh state; `params` (already sharded) replaces the random init, as when starting from a run."""
    def build(key, p):
        init_key, state_key = jax.random.split(key)
        if p is None:
            p = nn.unbox(init_params(init_key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p), rng=state_key)
    # Raw uint32 keys (not typed key arrays) so the rng checkpoints like any other array.
    key = jax.random.PRNGKey(seed)
    if params is None:
        return jax.jit(lambda k: build(k, None), out_shardings=shardings)(key)
    return jax.jit(build, out_shardings=shardings, donate_argnums=1)(key, params)
