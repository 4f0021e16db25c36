"""Training part of the params: gradients, optimizer state and shardings for the trainable leaves only."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llm_jax import sharding
from llm_jax.train.optimizer import only, trainable_of
from llm_jax.train.state import TrainState, create_state, partition, state_shardings
from llm_jax.train.step import make_eval_step, make_train_step

MASK = {"theta": True, "frozen": {"w": False, "bias": False}}


def _problem():
    """loss_sum = Σ_rows w_row · (x_row · θ + x_row · w_f + b_f − y_row)², weight = Σ w_row; only θ trains."""
    rng = np.random.default_rng(0)
    batch = dict(x=jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), y=jnp.asarray(rng.normal(size=8), jnp.float32),
                 w=jnp.asarray([1, 0, 2, 1, 3, 1, 0, 1], jnp.float32))
    params = {"theta": jnp.array([0.5, -1.0, 2.0]), "frozen": {"w": jnp.array([0.1, 0.2, 0.3]), "bias": jnp.array(0.7)}}

    def loss_fn(p, b, rng_):
        assert rng_ is not None  # the train step always hands the loss a key
        err = b["x"] @ (p["theta"] + p["frozen"]["w"]) + p["frozen"]["bias"] - b["y"]
        return jnp.sum(b["w"] * err**2), {"weight": jnp.sum(b["w"])}
    return batch, params, loss_fn


def _state(optimizer, params):
    trained, _ = partition(params, trainable_of(optimizer))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trained),
                      rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_only_the_trainable_leaves_move_and_accumulation_stays_exact(grad_accum):
    batch, params, loss_fn = _problem()
    optimizer = only(optax.adam(0.1), MASK)
    state = _state(optimizer, params)
    assert set(state.opt_state[0].mu) == {"theta"}  # no moments for frozen leaves
    schedule = optax.constant_schedule(0.1)
    new, metrics = jax.jit(make_train_step(loss_fn, optimizer, schedule, grad_accum))(state, batch)
    np.testing.assert_array_equal(new.params["frozen"]["w"], params["frozen"]["w"])
    np.testing.assert_array_equal(new.params["frozen"]["bias"], params["frozen"]["bias"])
    # the gradient is θ's alone: 2 Σ w·err·x / Σ w
    x, y, w = (np.asarray(batch[k]) for k in ("x", "y", "w"))
    err = x @ np.array([0.6, -0.8, 2.3]) + 0.7 - y
    grad = 2 * (w * err) @ x / w.sum()
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(new.params["theta"], params["theta"] - 0.1 * np.sign(grad), rtol=1e-5)  # Adam step 1


def test_an_explicit_mask_overrides_the_optimizer_and_none_trains_everything():
    batch, params, loss_fn = _problem()
    plain = optax.sgd(0.1)
    assert only(plain, None) is plain and trainable_of(plain) is None
    everything, _ = jax.jit(make_train_step(loss_fn, plain, optax.constant_schedule(0.1)))(_state(plain, params), batch)
    assert not np.array_equal(everything.params["frozen"]["w"], params["frozen"]["w"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=plain.init({"theta": params["theta"]}),
                       rng=jax.random.PRNGKey(0))
    masked, _ = jax.jit(make_train_step(loss_fn, plain, optax.constant_schedule(0.1), trainable=MASK))(state, batch)
    np.testing.assert_array_equal(masked.params["frozen"]["w"], params["frozen"]["w"])


def test_a_mask_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no parameter"):
        partition({"a": jnp.ones(2)}, {"a": False})


def test_eval_step_hands_the_loss_no_rng():
    seen = []

    def loss_fn(params, batch, rng):
        seen.append(rng)
        return jnp.sum(params["a"]), {"weight": jnp.ones(())}
    make_eval_step(loss_fn)({"a": jnp.ones(2)}, {})
    assert seen == [None]


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp")), (8, 4))
        head = self.param("head", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("mlp",)), (4,))
        return x @ w @ head


def test_state_shardings_and_create_state_for_a_partial_optimizer():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, sequence=1))
    rules = (("embed", "fsdp"), ("mlp", "tensor"))
    optimizer = only(optax.adam(0.1), lambda p: {"params": {"w": False, "head": True}})

    def init_params(key):
        return _Two().init(key, jnp.zeros((1, 8)))
    abstract, shardings = state_shardings(init_params, optimizer, mesh, rules)
    assert set(abstract.opt_state[0].mu["params"]) == {"head"}
    assert shardings.opt_state[0].mu["params"]["head"].spec == shardings.params["params"]["head"].spec
    # given a part of the params (as restored from another run), the rest starts from the init
    given = {"params": {"w": jax.device_put(np.full((8, 4), 3.0, np.float32), shardings.params["params"]["w"])}}
    state = create_state(init_params, optimizer, shardings, seed=0, params=given)
    np.testing.assert_array_equal(np.asarray(state.params["params"]["w"]), 3.0)
    fresh = create_state(init_params, optimizer, shardings, seed=0)
    np.testing.assert_array_equal(np.asarray(state.params["params"]["head"]),
                                  np.asarray(fresh.params["params"]["head"]))
    with pytest.raises(ValueError, match=r"entries the model lacks: \['nope'\]"):
        create_state(init_params, optimizer, shardings, seed=0, params={"params": {"nope": jnp.ones(2)}})


def test_optim_freeze_holds_the_params_it_names_beside_lora():
    import ml_collections
    from llm_jax.model.config import ModelConfig
    from llm_jax.model.transformer import Transformer
    from llm_jax.train.optimizer import param_path, trainable_rule
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, vocab_size=64)
    optim = ml_collections.ConfigDict(dict(freeze=""))
    assert trainable_rule(cfg, optim) is None  # nothing frozen, no LoRA: every param trains

    def mask_for(model_cfg, freeze):
        params = jax.eval_shape(lambda k: nn.unbox(Transformer(model_cfg).init(
            k, jnp.zeros((1, 4), jnp.int32), method=Transformer.logits)), jax.random.key(0))
        mask = trainable_rule(model_cfg, ml_collections.ConfigDict(dict(freeze=freeze)))(params)
        return {param_path(path): bool(m) for path, m in jax.tree_util.tree_leaves_with_path(mask)}

    mask = mask_for(cfg, "embedding, mlp/w_")
    frozen = {p for p, trains in mask.items() if not trains}
    assert frozen == {p for p in mask if p == "params/embedding" or "/mlp/w_" in p}
    assert len(frozen) >= 3 and mask["params/blocks/attn/wq"]
    # with LoRA, freezing can only take away: the base stays frozen and a named adapter joins it
    lora_cfg = ModelConfig(**{**cfg.__dict__, "lora_rank": 2})
    with_lora = mask_for(lora_cfg, "wq_lora")
    assert {p for p, trains in with_lora.items() if trains} == {p for p in with_lora if "_lora" in p and "wq_lora" not in p}
    with pytest.raises(ValueError, match=r"optim.freeze: '\(' is not a regular expression"):
        trainable_rule(cfg, ml_collections.ConfigDict(dict(freeze="embedding,(")))
