"""The README's main job through the installed `llm-jax` command: tokenizer, then the tiny pretraining run."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from llm_jax.train.metrics import read_metrics


def _llm_jax(*args):
    command = [shutil.which("llm-jax")] if shutil.which("llm-jax") else [sys.executable, "-m", "llm_jax.cli"]
    result = subprocess.run(command + list(args), capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_pretraining_learns_far_below_the_unigram_entropy(tmp_path):
    tok = _llm_jax("tokenizer", "--config", "configs/tokenizer.py:default", "--workdir", str(tmp_path / "tok"))
    assert tok["vocab_size"] == 2048 and tok["chars_per_token"] > 2
    # the first 100 of the README's 300 steps (its first eval): held-out loss ≈ 3.45, 2.2 nats below the unigram
    summary = _llm_jax("train", "--config", "configs/pretrain.py:tiny", "--workdir", str(tmp_path / "pre"),
                       f"--config.tokenizer.path={tok['path']}", "--config.train.steps=100")
    stats = read_metrics(tmp_path / "pre")[0]
    unigram, floor = stats["unigram_cross_entropy_nats"], stats["source_entropy_nats_per_token"]
    # A model that learned only token frequencies would sit at the unigram cross entropy; the source's exact
    # entropy is the floor no model can beat on average.
    assert summary["step"] == 100
    assert summary["eval_loss"] < unigram - 1.8, (summary["eval_loss"], unigram)
    assert summary["eval_loss"] > floor
    assert os.path.isdir(tmp_path / "pre" / "checkpoints" / "100")
