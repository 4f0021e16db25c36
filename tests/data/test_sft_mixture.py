"""SFT on a data mixture: each component's conversations rendered and packed on its own, mixed in exact shares,
each component's held-out rows an eval set of its own, weighted into the overall eval metrics; a short run logs
every component's eval loss."""
import json

import numpy as np
import pytest

from llm_jax import training
from llm_jax.config_lib import ConfigError, load
from llm_jax.data import chat, default_task, mixture, post_training
from llm_jax.data.post_training import build_sft_data
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.train.metrics import read_metrics
from run_fixtures import SMALL_OVERRIDES

N_MAIN, N_EXTRA = 120, 40


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two SFT record files that share no conversation: the task's first demonstrations ("main"), and the task's
    held-out prompts answered by their words in alphabetical order ("extra", a capability of one's own)."""
    root = tmp_path_factory.mktemp("sft_mixture")
    with open(default_task.write_default_task()["sft_train"]) as f:
        main = [json.loads(line) for _, line in zip(range(N_MAIN), f)]
    extra = [dict(prompt=p["prompt"], response=" ".join(sorted(p["prompt"].replace(",", "").split())))
             for p in (default_task.task_prompt(i, "eval") for i in range(N_EXTRA))]
    return dict(main=_write(root / "main.jsonl", main), extra=_write(root / "extra.jsonl", extra))


def _mixture(files, main_weight=0.75, extra_weight=0.25):
    return ("data.train=", "data.mixture={'main': {'train': '%s', 'weight': %r, 'eval': 'default_task'}, "
            "'extra': {'train': '%s', 'weight': %r, 'eval_fraction': 0.1}}"
            % (files["main"], main_weight, files["extra"], extra_weight))


def _config(small_tokenizer, *overrides):
    return load("configs/sft.py:tiny", [*SMALL_OVERRIDES, "train.init_from=", f"tokenizer.path={small_tokenizer}",
                                        "data.seq_len=64", *overrides])


def _component(config, name):
    """A component's rows built by hand, as SFT data of its own (its train and eval spec, its seed)."""
    component = config.data.copy_and_resolve_references()
    fields = dict(config.data.mixture[name])
    component.update(dict(train=fields["train"], eval=fields.get("eval", ""),
                          eval_fraction=fields.get("eval_fraction", config.data.eval_fraction)))
    return component, mixture._component_seed(config.seed, name)


def _rows(batches):
    return [r.tobytes() for b in batches for r in b["inputs"]]


def test_shares_are_exact_and_each_component_is_its_own_eval_set(files, small_tokenizer, tmp_path):
    config = _config(small_tokenizer, *_mixture(files))
    tokenizer = Tokenizer.load(small_tokenizer)
    data = build_sft_data(config, tokenizer, str(tmp_path))
    template = chat.get_template(config.data.chat_template)
    hand = {name: post_training._sft_rows(*_component(config, name), tokenizer, template) for name in ("main", "extra")}
    train_rows = {name: set(_rows([rows[0]])) for name, rows in hand.items()}
    assert not train_rows["main"] & train_rows["extra"]

    # 0.75 : 0.25 are mixed as 300 : 100, so every window of 400 rows holds 100 of extra's
    it = data.train_iterator()
    rows = _rows([next(it) for _ in range(100)])  # 800 rows of 8 a batch: two windows
    assert all(r in train_rows["main"] or r in train_rows["extra"] for r in rows)
    for window in (rows[:400], rows[400:]):
        assert sum(r in train_rows["extra"] for r in window) == 100
    assert (data.stats["main_share"], data.stats["extra_share"]) == (0.75, 0.25)

    # held out: main's eval spec (the task's held-out demonstrations), extra's hash-split tenth
    assert data.eval_weights == {"main": 0.75, "extra": 0.25}
    for name in ("main", "extra"):
        for key, value in hand[name][1].items():
            np.testing.assert_array_equal(data.eval_sets[name][key], value)
        assert data.stats[f"{name}_n_train_examples"] == hand[name][2]["n_train_examples"]
    assert sum(data.stats[f"extra_n_{split}_{what}"] for split in ("train", "eval")
               for what in ("examples", "too_long")) == N_EXTRA
    assert data.stats["main_n_train_examples"] + data.stats["main_n_train_too_long"] == N_MAIN
    assert data.stats["n_train_examples"] == data.stats["main_n_train_examples"] + data.stats["extra_n_train_examples"]


def test_a_mixture_beside_data_train_is_refused(files, small_tokenizer, tmp_path):
    config = _config(small_tokenizer, *_mixture(files)[1:], f"data.train={files['main']}")
    with pytest.raises(ConfigError, match=r"data.train='.*main.jsonl' and data.mixture \(extra, main\) both name"):
        build_sft_data(config, Tokenizer.load(small_tokenizer), str(tmp_path))


@pytest.mark.slow
def test_a_run_logs_each_components_eval_loss_and_their_weighted_mean(files, small_tokenizer, tmp_path):
    config = _config(small_tokenizer, *_mixture(files, 0.6, 0.4), "train.steps=4", "train.eval_every=2",
                     "train.checkpoint_every=4")
    training.run(config, str(tmp_path / "run"))
    metrics = read_metrics(str(tmp_path / "run"))
    assert metrics[0]["main_share"] == 0.6 and metrics[0]["extra_share"] == 0.4
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert m["eval_main_loss"] != m["eval_extra_loss"]
        assert m["eval_loss"] == pytest.approx(0.6 * m["eval_main_loss"] + 0.4 * m["eval_extra_loss"])
