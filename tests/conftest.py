"""Every test sees 8 emulated CPU devices, so every sharding path runs without an accelerator."""
import os

# Must happen before jax is imported anywhere. Eight emulated devices share two cores, so a collective can wait
# long for a starved device thread on a loaded machine: give rendezvous minutes, not XLA's default 40 s.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    " --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Nothing in the tests downloads: lm-eval's datasets and Hugging Face files come from local files only.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402  (after the environment is set)
from run_fixtures import END_LOGIT_GAP, SMALL_OVERRIDES, save_run  # noqa: E402


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer trained on the default corpus, shared by every test that needs a real one."""
    from llm_jax.config_lib import load
    from llm_jax.data.tokenizer_stage import run_tokenizer
    workdir = tmp_path_factory.mktemp("tok")
    return run_tokenizer(load("configs/pretrain.py:tiny", SMALL_OVERRIDES), str(workdir))["path"]


@pytest.fixture
def small_overrides():
    return list(SMALL_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_rl_runs(small_tokenizer, tmp_path_factory):
    """(policy run, reward run) directories of fresh, untrained models saved as checkpoints (see tests/run_fixtures.py)."""
    import jax
    import jax.numpy as jnp

    from llm_jax.data.tokenizer import Tokenizer
    end = Tokenizer.load(small_tokenizer).special_id("<|end|>")

    def stopping_policy(params):
        # Tied embeddings: dim 0 of every embedding is 1 and the final norm keeps only dim 0, so every logit is
        # h_0 · 1 (a uniform draw) except <|end|>'s, h_0 · (1 + gap).
        p = params["params"]
        table_vd = p["embedding"].at[:, 0].set(1.0).at[end, 0].set(1.0 + END_LOGIT_GAP)
        scale_d = jnp.zeros_like(p["final_norm"]["scale"]).at[0].set(1.0)
        return {"params": {**p, "embedding": table_vd, "final_norm": {"scale": scale_d}}}

    def random_head(params):
        p = params["params"]
        head_d = jax.random.normal(jax.random.key(1), p["reward_head"].shape) * 10.0
        return {"params": {**p, "reward_head": head_d}}

    root = tmp_path_factory.mktemp("rl_runs")
    policy = save_run(root / "sft", "configs/sft.py:tiny", small_tokenizer, stopping_policy)
    rm = save_run(root / "rm", "configs/reward.py:tiny", small_tokenizer, random_head)
    return policy, rm


@pytest.fixture(scope="session")
def pretrained(small_tokenizer, tmp_path_factory):
    """A pretraining run (RL_MODEL_OVERRIDES' small model) whose weights are a fresh init moved by N(0, 0.02²)
    noise: a base that is not all init values, for the stages that start from one (tests/run_fixtures.py)."""
    import jax

    def perturbed(params):
        keys = iter(jax.random.split(jax.random.key(7), 64))
        return jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape), params)
    return save_run(tmp_path_factory.mktemp("pretrained") / "pre", "configs/pretrain.py:tiny", small_tokenizer,
                    perturbed)
