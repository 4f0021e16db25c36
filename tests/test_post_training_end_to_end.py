"""A short chain on the embedded task through the `llm-jax` command: pretrain, SFT, reward model, DPO, generate;
each stage starts from the one before and its metrics move the way the objective says."""
import json

import pytest

from llm_jax.train.metrics import read_metrics
from test_end_to_end import _llm_jax

SMALL = ["--config.model.n_layers=2", "--config.model.d_model=64", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=1", "--config.model.d_ff=128", "--config.model.vocab_size=512",
         "--config.tokenizer.vocab_size=512", "--config.train.log_every=10"]


def _evals(run_dir, key):
    return [m[key] for m in read_metrics(run_dir) if key in m]


@pytest.mark.slow
def test_sft_reward_and_dpo_chain_on_the_embedded_task(tmp_path, small_tokenizer):
    pre, sft, rm, dpo = (str(tmp_path / name) for name in ("pre", "sft", "rm", "dpo"))
    _llm_jax("train", "--config", "configs/pretrain.py:tiny", "--workdir", pre, *SMALL,
             f"--config.tokenizer.path={small_tokenizer}", "--config.train.steps=40", "--config.train.eval_every=40")
    stage = ["--config.train.eval_every=30", "--config.train.checkpoint_every=60", "--config.train.eval_batches=4"]
    _llm_jax("train", "--config", f"configs/sft.py:tiny,init_from={pre}", "--workdir", sft, *SMALL, *stage,
             "--config.train.steps=60")
    sft_losses = _evals(sft, "eval_loss")
    assert len(sft_losses) == 2 and sft_losses[1] < sft_losses[0]
    assert read_metrics(sft)[0]["train_response_token_fraction"] < 0.5  # the loss counts answers only

    _llm_jax("train", "--config", f"configs/reward.py:tiny,init_from={sft}", "--workdir", rm, *SMALL, *stage,
             "--config.train.steps=60", "--config.optim.lr=1e-3")
    rm_losses = _evals(rm, "eval_loss")  # log 2 = 0.693 where chosen and rejected score the same
    assert rm_losses[-1] < rm_losses[0] < 0.6932, rm_losses
    assert _evals(rm, "eval_margin")[-1] > 0

    summary = _llm_jax("train", "--config", f"configs/dpo.py:tiny,init_from={sft}", "--workdir", dpo, *SMALL,
                       *stage, "--config.train.steps=60")
    # DPO starts at the reference: loss log 2, margin 0, and both move the right way
    assert _evals(dpo, "eval_loss")[-1] < 0.6931 and _evals(dpo, "eval_margin")[-1] > 0
    assert summary["eval_accuracy"] > 0.5

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "task": p.split(",")[0]}) + "\n"
                               for p in ["copy, zuma bru", "reverse, zuma bru kear", "first, bru zuma"]))
    out = _llm_jax("generate", "--run", sft, "--prompts", str(prompts), "--max-new-tokens", "8",
                   "--out", str(tmp_path / "gen.jsonl"))
    assert out["count"] == 3 and 0.0 <= out["gold_score"] <= 1.0
