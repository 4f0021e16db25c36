"""Every test sees 8 emulated CPU devices, so every sharding path runs without an accelerator."""
import os

# Must happen before jax is imported anywhere. Eight emulated devices share two cores, so a collective can wait
# long for a starved device thread on a loaded machine: give rendezvous minutes, not XLA's default 40 s.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    " --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment is set)

SMALL_OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=128",
    "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=32", "data.batch_size=8",
    "optim.warmup_steps=2", "train.steps=8", "train.log_every=1", "train.eval_every=4",
    "train.checkpoint_every=4", "train.eval_batches=2",
]


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


# A policy that stops about 4 samples in 5 within 8 tokens (K samples of a prompt differ, some stop, some run to
# max_new_tokens) and a reward model whose random head rewards answers differently; shared by the tests of the
# commands that sample K answers per prompt (tests/rl). data.seq_len=48 fits the prompts and 8 new tokens.
RL_MODEL_OVERRIDES = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
                      "model.d_ff=128", "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=48"]
# × the final hidden state's ≈ 7.7 in dim 0: p(<|end|>) ≈ e^4.6 / (e^4.6 + 511) ≈ 0.17 a step, so about 4 samples
# in 5 stop within 8 tokens
END_LOGIT_GAP = 0.6


def _save_run(workdir, config_spec, tokenizer_path, edit, overrides=None, metrics=()):
    """A run directory (config.json, tokenizer.model, one checkpoint, and metrics.jsonl holding `metrics`) of a
    fresh model of `config_spec` (with `overrides`, the RL model by default) edited by `edit`."""
    import json
    import shutil

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from llm_jax.config_lib import load
    from llm_jax.model.config import ModelConfig
    from llm_jax.model.transformer import Transformer
    from llm_jax.objectives import get_objective
    from llm_jax.train.checkpoint import checkpoint_dir

    config = load(config_spec, list(RL_MODEL_OVERRIDES if overrides is None else overrides)
                  + [f"tokenizer.path={tokenizer_path}"])
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    if metrics:
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
    shutil.copy(tokenizer_path, os.path.join(workdir, "tokenizer.model"))
    model = getattr(get_objective(config.objective), "model_class", Transformer)(ModelConfig.from_config(config.model))
    params = nn.unbox(model.init(jax.random.key(len(config.objective)), jnp.zeros((1, 8), jnp.int32)))
    params = edit(params)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    manager.close()
    return str(workdir)


@pytest.fixture(scope="session")
def tiny_rl_runs(small_tokenizer, tmp_path_factory):
    """(policy run, reward run) directories of fresh, untrained models saved as checkpoints (see above)."""
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
    policy = _save_run(root / "sft", "configs/sft.py:tiny", small_tokenizer, stopping_policy)
    rm = _save_run(root / "rm", "configs/reward.py:tiny", small_tokenizer, random_head)
    return policy, rm
