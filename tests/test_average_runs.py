"""Checkpoint averaging (llm_jax/average.py): the mean of two runs is their params' mean by hand, a LoRA run is
averaged as its merged weights into a full-precision run, the result is a run every stage loads, and runs that
cannot be averaged are refused in one line naming what differs."""
import json
import os

import jax
import numpy as np
import pytest

from run_fixtures import RL_MODEL_OVERRIDES, save_run
from llm_jax import runs
from llm_jax.average import RECORD, AverageError, average_runs
from llm_jax.data import default_corpus
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.model import lora
from llm_jax.train.run_record import check_lineage
from llm_jax.config_lib import load


def _perturbed(seed, scale=0.05):
    def edit(params):
        keys = iter(jax.random.split(jax.random.key(seed), 256))
        return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), params)
    return edit


def _host(params):
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("average")
    return [save_run(root / name, spec, small_tokenizer, _perturbed(seed))
            for name, spec, seed in (("sft", "configs/sft.py:tiny", 1), ("dpo", "configs/dpo.py:tiny", 2))]


def test_the_average_is_the_mean_by_hand_and_a_run_every_stage_takes(two_runs, tmp_path):
    out = str(tmp_path / "avg")
    summary = average_runs(two_runs, out)
    a, b = (_host(runs.load_run(d).params) for d in two_runs)
    want = jax.tree.map(lambda x, y: (x.astype(np.float32) + y.astype(np.float32)) / 2, a, b)
    averaged = runs.load_run(out)
    jax.tree.map(np.testing.assert_array_equal, _host(averaged.params), want)
    assert not np.array_equal(a["params"]["embedding"], b["params"]["embedding"])

    assert [s["run"] for s in summary["sources"]] == two_runs and [s["step"] for s in summary["sources"]] == [1, 1]
    assert json.load(open(os.path.join(out, RECORD))) == summary
    assert averaged.config.objective == "sft" and averaged.tokenizer.sha256 == runs.load_run(two_runs[0]).tokenizer.sha256
    assert not os.path.exists(f"{out}.partial")
    # a later stage starts from it (same model, checked as any train.init_from is), and the answer is the same
    # when asked again, without writing anything
    check_lineage(load("configs/sft.py:tiny", RL_MODEL_OVERRIDES), out)
    stamp = os.path.getmtime(os.path.join(out, RECORD))
    assert average_runs(two_runs, out) == summary and os.path.getmtime(os.path.join(out, RECORD)) == stamp


def test_a_lora_run_is_averaged_as_its_merged_weights(two_runs, tmp_path, small_tokenizer):
    lora_run = save_run(tmp_path / "lora", "configs/sft.py:tiny", small_tokenizer, _perturbed(3, 0.1),
                        overrides=RL_MODEL_OVERRIDES + ["model.lora_rank=4", "model.lora_targets=wq,wv"])
    out = str(tmp_path / "avg")
    summary = average_runs([two_runs[0], lora_run], out)
    lora_params = runs.load_run(lora_run)
    merged = _host(lora.merge(lora_params.params, lora_params.model_cfg))
    plain = _host(runs.load_run(two_runs[0]).params)
    want = jax.tree.map(lambda x, y: (x.astype(np.float32) + y.astype(np.float32)) / 2, plain, merged)
    averaged = runs.load_run(out)
    jax.tree.map(np.testing.assert_array_equal, _host(averaged.params), want)
    assert (averaged.model_cfg.lora_rank, averaged.model_cfg.base_quant) == (0, "none")
    assert summary["merged"] == [lora_run]


def test_runs_that_cannot_be_averaged_are_refused_in_one_line(two_runs, tmp_path, small_tokenizer):
    wide = save_run(tmp_path / "wide", "configs/sft.py:tiny", small_tokenizer, lambda p: p,
                    overrides=[o if o != "model.d_ff=128" else "model.d_ff=256" for o in RL_MODEL_OVERRIDES])
    reward = save_run(tmp_path / "rm", "configs/reward.py:tiny", small_tokenizer, lambda p: p)
    docs = [r["text"] for _, r in zip(range(300), default_corpus.iter_default_corpus_records())]
    other_tokenizer = train_tokenizer(docs, str(tmp_path / "other.model"), vocab_size=512)
    retokenized = save_run(tmp_path / "retok", "configs/sft.py:tiny", other_tokenizer.path, lambda p: p)
    cases = [
        ([two_runs[0]], r"averaging needs at least 2 runs, got 1"),
        ([two_runs[0], wide], r"cannot average '.*sft' and '.*wide': model.d_ff is 128 in one, 256 in the other"),
        ([two_runs[0], reward], r"cannot average '.*sft' \(objective 'sft'\) and '.*rm' \(objective 'reward'\): "
                                r"their models are of different kinds"),
        ([two_runs[0], retokenized], r"cannot average '.*sft' and '.*retok': their tokenizers differ"),
    ]
    for run_dirs, message in cases:
        with pytest.raises(AverageError, match=message) as error:
            average_runs(run_dirs, str(tmp_path / "out"))
        assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(AverageError, match=r"taken is not empty and holds no average"):
        average_runs(two_runs, str(tmp_path / "taken"))
