"""PPO's pieces reach the KL-regularised optimum on a one-step bandit.

A policy over a handful of responses, rewards r(y) and a reference π_ref: maximising E_π[r] − β·KL(π‖π_ref)
has the closed form π*(y) ∝ π_ref(y)·exp(r(y)/β). Each iteration samples from the current policy, pays every
sample r(y) − β·k1 (token_rewards on one-token responses), takes GAE with no value (the whitened advantage
subtracts the batch mean: a baseline) and a few epochs of the clipped policy loss; the policy must end at π*.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax.rl import losses

REF_LOGITS = jnp.array([1.0, 0.5, 0.0, -0.5, -1.0])
REWARDS = jnp.array([0.0, 1.0, 0.3, 2.0, -1.0])
BETA = 0.5
N_SAMPLES, ITERATIONS, EPOCHS = 4096, 150, 4


def test_ppo_moves_a_bandit_policy_to_the_kl_regularised_optimum():
    optimum = jax.nn.softmax(jax.nn.log_softmax(REF_LOGITS) + REWARDS / BETA)
    ref_logp_v = jax.nn.log_softmax(REF_LOGITS)
    optimizer = optax.adam(optax.linear_schedule(0.05, 0.005, ITERATIONS * EPOCHS))

    def iteration(carry, key):
        logits, opt_state = carry
        actions = jax.random.categorical(key, logits, shape=(N_SAMPLES,))
        old_logp = jax.nn.log_softmax(logits)[actions][:, None]
        mask = jnp.ones((N_SAMPLES, 1))
        kl = losses.kl_estimate(old_logp, ref_logp_v[actions][:, None], "k1")
        rewards = losses.token_rewards(REWARDS[actions], kl, mask, BETA)
        advantages, _ = losses.gae(rewards, jnp.zeros_like(rewards), mask, 1.0, 1.0)
        advantages = losses.whiten(advantages, mask)

        def loss(l):
            logp = jax.nn.log_softmax(l)[actions][:, None]
            return losses.policy_loss(logp, old_logp, advantages, mask, 0.2)[0] / N_SAMPLES

        def epoch(carry, _):
            l, s = carry
            updates, s = optimizer.update(jax.grad(loss)(l), s)
            return (optax.apply_updates(l, updates), s), None

        (logits, opt_state), _ = jax.lax.scan(epoch, (logits, opt_state), None, length=EPOCHS)
        return (logits, opt_state), None

    start = (REF_LOGITS, optimizer.init(REF_LOGITS))
    (logits, _), _ = jax.jit(lambda c, k: jax.lax.scan(iteration, c, k))(
        start, jax.random.split(jax.random.key(0), ITERATIONS))
    policy = jax.nn.softmax(logits)
    np.testing.assert_allclose(policy, optimum, atol=0.02)
    assert not np.allclose(jax.nn.softmax(REF_LOGITS), optimum, atol=0.1)  # it really had to move
