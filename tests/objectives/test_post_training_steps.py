"""SFT rows count only assistant tokens; preference rows hold both answers; the reward and DPO train steps on an
8-device mesh match one device."""
import json

import jax
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.config_lib import load
from llm_jax.data.post_training import build_sft_data
from llm_jax.data.preference_rows import render_preferences
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.model.config import ModelConfig
from llm_jax.objectives import get_objective
from llm_jax.train.loop import build_training

SMALL_MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
               "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=48", "data.batch_size=8"]


def write_records(path, rows):
    """rows as a jsonl file at path; its name."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tokenizer(small_tokenizer):
    return Tokenizer.load(small_tokenizer)


def test_sft_rows_count_only_assistant_tokens(tmp_path, tokenizer):
    train = write_records(tmp_path / "sft.jsonl", [
        {"prompt": "the cat", "response": "a dog"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "some"},
                      {"role": "assistant", "content": "no"}, {"role": "user", "content": "each"},
                      {"role": "assistant", "content": "this that"}]},
    ] * 16)
    config = load("configs/sft.py:tiny", SMALL_MODEL + [f"data.train={train}", f"data.eval={train}"])
    data = build_sft_data(config, tokenizer, str(tmp_path))
    batch = data.eval_batches(1)[0]
    counted = batch["targets"][0][batch["loss_mask"][0] > 0]
    expected = []  # the assistant contents and the end marker of each assistant turn, in order
    end = tokenizer.special_id("<|end|>")
    for text in ["a dog", "no", "this that"]:
        expected += tokenizer.encode(text) + [end]
    assert counted[:len(expected)].tolist() == expected
    per_copy = len(expected)
    all_counted = sum(int(b["loss_mask"].sum()) for b in data.eval_batches(100))
    assert all_counted == per_copy * 16  # sixteen copies of the two examples, nothing else counted
    assert data.stats["n_train_examples"] == 32


def test_preference_rows_mask_the_answers_only(tmp_path, tokenizer):
    train = write_records(tmp_path / "pairs.jsonl", [{"prompt": "the cat", "chosen": "a dog", "rejected": "no"}] * 8)
    config = load("configs/reward.py:tiny", SMALL_MODEL + [f"data.train={train}", f"data.eval={train}"])
    rows, _, stats = render_preferences(config, tokenizer, str(tmp_path))
    end = tokenizer.special_id("<|end|>")
    for side, text in (("chosen", "a dog"), ("rejected", "no")):
        mask, targets = rows[f"{side}_loss_mask"][0], rows[f"{side}_targets"][0]
        assert targets[mask > 0].tolist() == tokenizer.encode(text) + [end]
        n_real = int(rows[f"{side}_segment_ids"][0].sum())
        assert targets[n_real - 1] == tokenizer.eos_id and mask[n_real - 1] == 0  # the eos target never counts
    assert stats["n_train_pairs"] == 8


def _pair_batch(seed, batch=8, seq=32, vocab=512):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(seq // 2, seq, batch)
        real = np.arange(seq)[None, :] < lengths[:, None]
        out[f"{side}_inputs"] = np.where(real, rng.integers(4, vocab, (batch, seq)), 0).astype(np.int32)
        out[f"{side}_targets"] = np.where(real, rng.integers(4, vocab, (batch, seq)), 0).astype(np.int32)
        out[f"{side}_positions"] = np.broadcast_to(np.arange(seq), (batch, seq)).astype(np.int32)
        out[f"{side}_segment_ids"] = real.astype(np.int32)
        out[f"{side}_loss_mask"] = (real & (np.arange(seq)[None, :] >= seq // 4)).astype(np.float32)
    out["ref_chosen_logp"] = rng.normal(-20, 3, batch).astype(np.float32)
    out["ref_rejected_logp"] = rng.normal(-20, 3, batch).astype(np.float32)
    return out


def _train(config_name, mesh_axes, devices, steps=2, extra=()):
    config = load(f"configs/{config_name}.py:tiny", SMALL_MODEL + ["data.seq_len=32", "optim.lr=1e-2",
                                                                   "optim.warmup_steps=0", *extra])
    config.mesh.update(mesh_axes)
    mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.check_rules(config.mesh_rules)
    training = build_training(config, ModelConfig.from_config(config.model), mesh, rules,
                              get_objective(config.objective))
    state, history = training.create_state(), []
    for i in range(steps):
        state, metrics = training.train_step(state, sharding.global_batch_from_local(_pair_batch(i), mesh, rules))
        history.append([float(metrics[k]) for k in ("loss", "grad_norm", "accuracy")])
    return history


@pytest.mark.parametrize("objective,extra", [("reward", ()), ("reward", ("reward.readout=last",)), ("dpo", ())])
def test_sharded_preference_steps_match_one_device(objective, extra):
    want = _train(objective, dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1], extra=extra)
    got = _train(objective, dict(data=2, fsdp=2, tensor=2, sequence=1), jax.devices(), extra=extra)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert want[0][0] > 0 and np.isfinite(want).all()
