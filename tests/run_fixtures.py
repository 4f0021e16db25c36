"""Run directories made without training, for the tests of the stages that read runs (a module of its own, not
conftest.py: several test folders have a conftest, and `from conftest import` would find whichever came first)."""
import os

# A model and run small enough to train in seconds, shared by the end-to-end tests.
SMALL_OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=128",
    "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=32", "data.batch_size=8",
    "optim.warmup_steps=2", "train.steps=8", "train.log_every=1", "train.eval_every=4",
    "train.checkpoint_every=4", "train.eval_batches=2",
]

# A policy that stops about 4 samples in 5 within 8 tokens (K samples of a prompt differ, some stop, some run to
# max_new_tokens) and a reward model whose random head rewards answers differently; shared by the tests of the
# commands that sample K answers per prompt (tests/rl). data.seq_len=48 fits the prompts and 8 new tokens.
RL_MODEL_OVERRIDES = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
                      "model.d_ff=128", "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=48"]
# × the final hidden state's ≈ 7.7 in dim 0: p(<|end|>) ≈ e^4.6 / (e^4.6 + 511) ≈ 0.17 a step, so about 4 samples
# in 5 stop within 8 tokens
END_LOGIT_GAP = 0.6


def save_run(workdir, config_spec, tokenizer_path, edit, overrides=None, metrics=()):
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
    from llm_jax.train import manifest
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
    manifest.write(os.path.join(checkpoint_dir(workdir), "1"), 1)  # as every run's checkpoint has
    return str(workdir)


