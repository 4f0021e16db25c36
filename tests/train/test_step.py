"""The shared step: exact loss values, gradient accumulation, schedules and the decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.configs_common import base_config
from llm_jax.objectives.lm import cross_entropy
from llm_jax.train.optimizer import decay_mask, learning_rate_schedule
from llm_jax.train.step import make_train_step, split_micro_batches
from llm_jax.train.state import TrainState


def test_cross_entropy_matches_hand_computed_values():
    logits = jnp.array([[[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]])  # (B=1, T=2, V=3)
    targets = jnp.array([[1, 0]])
    # position 0: uniform over 3 -> ln 3; position 1: ln(e^2 + 1 + e^-1) - 2
    expected = [np.log(3.0), np.log(np.e**2 + 1 + np.e**-1) - 2.0]
    loss_sum, weight = cross_entropy(logits, targets, jnp.array([[1.0, 1.0]]))
    np.testing.assert_allclose(loss_sum, sum(expected), rtol=1e-6)
    assert weight == 2.0
    masked_sum, masked_weight = cross_entropy(logits, targets, jnp.array([[0.0, 1.0]]))
    np.testing.assert_allclose(masked_sum, expected[1], rtol=1e-6)
    assert masked_weight == 1.0


def _quadratic_problem():
    """loss_sum = Σ_rows w_row · (x_row · θ − y_row)²; weight = Σ w_row. Rows have unequal weights so a wrong
    (per-micro-batch) average would show."""
    rng = np.random.default_rng(0)
    batch = dict(x=jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), y=jnp.asarray(rng.normal(size=8), jnp.float32),
                 w=jnp.asarray([1, 0, 2, 1, 3, 1, 0, 1], jnp.float32))

    def loss_fn(params, b, rng_):
        del rng_
        err = b["x"] @ params["theta"] - b["y"]
        return jnp.sum(b["w"] * err**2), {"weight": jnp.sum(b["w"])}
    return batch, loss_fn


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_gradient_accumulation_equals_the_full_batch(grad_accum):
    batch, loss_fn = _quadratic_problem()
    optimizer = optax.sgd(0.1)
    params = {"theta": jnp.array([0.5, -1.0, 2.0])}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       rng=jax.random.PRNGKey(0))
    schedule = optax.constant_schedule(0.1)
    full_state, full = jax.jit(make_train_step(loss_fn, optimizer, schedule, 1))(state, batch)
    acc_state, acc = jax.jit(make_train_step(loss_fn, optimizer, schedule, grad_accum))(state, batch)
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_state.params["theta"], full_state.params["theta"], rtol=1e-5)
    # and the mean is the weighted mean over all rows
    err = np.asarray(batch["x"]) @ np.array([0.5, -1.0, 2.0]) - np.asarray(batch["y"])
    np.testing.assert_allclose(full["loss"], np.sum(np.asarray(batch["w"]) * err**2) / 9.0, rtol=1e-5)


def test_micro_batches_take_every_nth_row():
    out = split_micro_batches({"a": jnp.arange(8)}, 4)["a"]
    np.testing.assert_array_equal(out, [[0, 4], [1, 5], [2, 6], [3, 7]])


def _optim(**kw):
    c = base_config().optim
    c.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, **kw)
    return c


def test_cosine_schedule():
    s = learning_rate_schedule(_optim(schedule="cosine"), total_steps=110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_warmup_stable_decay_schedule():
    s = learning_rate_schedule(_optim(schedule="wsd", decay_fraction=0.2), total_steps=110)
    # warmup 10, stable until 90, linear decay to 0.1 over the last 20
    np.testing.assert_allclose([s(10), s(50), s(90), s(100), s(110)], [1.0, 1.0, 1.0, 0.55, 0.1], atol=1e-6)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        learning_rate_schedule(_optim(schedule="linear"), 10)


def test_weight_decay_skips_norm_scales():
    params = {"blocks": {"attn_norm": {"scale": jnp.ones((2, 4))}, "mlp": {"w_up": jnp.ones((2, 4, 8))}},
              "embedding": jnp.ones((10, 4)), "bias": jnp.ones(4)}
    mask = decay_mask(params)
    assert mask == {"blocks": {"attn_norm": {"scale": False}, "mlp": {"w_up": True}}, "embedding": True,
                    "bias": False}
