"""Meshes, rules and the promise that sharding never changes the numbers."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_jax import sharding
from llm_jax.configs_common import DEFAULT_RULES, base_config
from llm_jax.model.config import ModelConfig
from llm_jax.objectives import get_objective
from llm_jax.train.loop import build_training


def _config():
    c = base_config()
    c.model.update(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=128)
    c.data.update(seq_len=16, batch_size=8)
    c.optim.update(lr=1e-2, warmup_steps=0)
    c.train.steps = 10
    return c


def _batch(seed=0, batch=8, seq=16, vocab=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (batch, seq + 1)).astype(np.int32)
    segments = np.repeat(np.array([[1] * (seq // 2) + [2] * (seq - seq // 2)]), batch, 0).astype(np.int32)
    positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segments,
                positions=np.repeat(positions[None], batch, 0).astype(np.int32),
                loss_mask=np.ones((batch, seq), np.float32))


def _train(config, mesh_axes, devices, steps=2):
    config.mesh.update(mesh_axes)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh_rules)
    t = build_training(config, ModelConfig.from_config(config.model), mesh, rules,
                              get_objective(config.objective))
    state = t.create_state()
    history = []
    for i in range(steps):
        batch = sharding.global_batch_from_local(_batch(seed=i), mesh, rules)
        state, metrics = t.train_step(state, batch)
        history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return state, history


@pytest.mark.parametrize("mesh_axes", [
    dict(data=2, fsdp=2, tensor=2, sequence=1),
    dict(data=1, fsdp=4, tensor=1, sequence=2),
    dict(data=8, fsdp=1, tensor=1, sequence=1),
])
def test_sharded_train_step_matches_one_device(mesh_axes):
    single, single_losses = _train(_config(), dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
    sharded, sharded_losses = _train(_config(), mesh_axes, jax.devices())
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)  # losses and gradient norms
    # Adam divides each gradient by its own RMS, so where a gradient is ~0 float rounding can move an update
    # by a visible fraction of lr: compare params on the scale of one update (lr = 1e-2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=5e-4),
                 sharded.params, single.params)


def test_parameters_are_sharded_as_the_rules_say():
    state, _ = _train(_config(), dict(data=2, fsdp=2, tensor=2, sequence=1), jax.devices(), steps=1)
    attn = state.params["params"]["blocks"]["attn"]
    assert attn["wq"].sharding.spec == P(None, "fsdp", "tensor", None)   # (layers, embed, heads, head_dim)
    assert attn["wo"].sharding.spec == P(None, "tensor", None, "fsdp")   # (layers, heads, head_dim, embed)
    assert state.params["params"]["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
    # each device holds an eighth... of wq: half the embed rows and half the heads
    assert attn["wq"].addressable_shards[0].data.shape == (2, 32, 2, 16)
    adam_mu = state.opt_state[1][0].mu["params"]["blocks"]["attn"]["wq"]
    assert adam_mu.sharding.spec == attn["wq"].sharding.spec  # optimizer moments follow their params


def test_mesh_shape_resolves_and_rejects():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2, sequence=1), 8)["data"] == 2
    with pytest.raises(sharding.ShardingError, match="does not divide 8"):
        sharding.mesh_shape(dict(data=-1, fsdp=3, tensor=1, sequence=1), 8)
    with pytest.raises(sharding.ShardingError, match="has 6 positions but there are 8 devices"):
        sharding.mesh_shape(dict(data=3, fsdp=2, tensor=1, sequence=1), 8)
    with pytest.raises(sharding.ShardingError, match="at most one mesh axis may be -1"):
        sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1, sequence=1), 8)


def test_batch_that_does_not_divide_is_named():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, sequence=1))
    with pytest.raises(sharding.ShardingError, match=r"micro-batch of 6 sequences .* total size 4"):
        sharding.check_batch(6, 16, mesh, DEFAULT_RULES)
    with pytest.raises(sharding.ShardingError, match="not divisible by optim.grad_accum=3"):
        sharding.check_batch(8, 16, mesh, DEFAULT_RULES, grad_accum=3)
    sharding.check_batch(16, 16, mesh, DEFAULT_RULES, grad_accum=4)


def test_logical_specs_and_bad_rules():
    assert sharding.logical_to_spec(("batch", "length", "act_embed"), DEFAULT_RULES) == P(("data", "fsdp"), "sequence", None)
    with pytest.raises(sharding.ShardingError, match="logical axis 'wat' has no rule"):
        sharding.logical_to_spec(("wat",), DEFAULT_RULES)
    with pytest.raises(sharding.ShardingError, match="names mesh axis 'model'"):
        sharding.check_rules((("heads", "model"),))


@pytest.mark.parametrize("mesh_axes", [
    dict(data=2, fsdp=2, tensor=2, sequence=1),
    dict(data=1, fsdp=2, tensor=2, sequence=2),
])
def test_pallas_attention_in_a_sharded_train_step_matches_the_reference(mesh_axes):
    """The flash kernel under shard_map (interpret mode here) gives the reference's losses and gradients."""
    reference, pallas = _config(), _config()
    reference.model.attention_impl, pallas.model.attention_impl = "reference", "pallas"
    _, want = _train(reference, mesh_axes, jax.devices())
    _, got = _train(pallas, mesh_axes, jax.devices())
    np.testing.assert_allclose(got, want, rtol=1e-5)
