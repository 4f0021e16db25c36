"""`llm-jax classifier` end to end on the smoke preset, its errors, and prepare's classifier steps with a model
that has learnt a planted token: they drop the planted documents (toxicity) or keep only them (quality), report
their scores, and a workdir refuses a rerun with another model."""
import json
import os
import re

import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.config_lib import load
from llm_jax.config_lib import ConfigError
from llm_jax.data import default_corpus
from llm_jax.data.prepare import prepare_stage
from llm_jax.data.prepare.classifier_stage import run_classifier

SIGNAL = "zorblax"
# One-sentence documents, like the examples the model learns from: in a long document the mean of embeddings
# dilutes one planted token (classifier_train.py).
CLEAN = [t.split("\n")[0].split(". ")[0] for t, _ in default_corpus.generate_documents(40, seed=21)]


def _planted_files(directory) -> tuple[str, str]:
    """Examples: one-sentence documents, positives with SIGNAL; returns (positive, negative) jsonl paths."""
    rng = np.random.default_rng(0)
    sentences = [t.split("\n")[0].split(". ")[0] for t, _ in default_corpus.generate_documents(1200, seed=9)]
    paths = []
    for name, chosen in (("pos.jsonl", sentences[0::2]), ("neg.jsonl", sentences[1::2])):
        lines = []
        for text in chosen:
            words = text.split(" ")
            if name == "pos.jsonl":
                words.insert(int(rng.integers(len(words) + 1)), SIGNAL)
            lines.append(json.dumps({"text": " ".join(words)}))
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        paths.append(path)
    return tuple(paths)


def _classifier_config(positive: str, negative: str, *overrides: str):
    return load("configs/classifier.py:smoke", [f"positive.spec={positive}", f"negative.spec={negative}",
                                                "features.buckets=16384", "train.epochs=6", "train.learning_rate=0.1",
                                                "train.adam_eps=1e-3", *overrides])


@pytest.fixture(scope="module")
def signal_model(tmp_path_factory):
    """A classifier trained on the planted examples; returns (workdir, summary)."""
    directory = str(tmp_path_factory.mktemp("signal"))
    positive, negative = _planted_files(directory)
    workdir = os.path.join(directory, "clf")
    return workdir, run_classifier(_classifier_config(positive, negative), workdir)


def test_the_smoke_preset_trains_reports_and_repeats_itself(tmp_path, capsys):
    assert main(["classifier", "--config", "configs/classifier.py:smoke", "--workdir", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["roc_auc"] > 0.8 and summary["heldout_docs"] > 50
    with open(tmp_path / "a" / "classifier.json") as f:
        info = json.load(f)
    assert info["model_sha256"] == summary["sha256"]
    assert info["data"]["positive"]["spec"] == "generated:quality-positive" and info["data"]["negative"]["docs"] == 300
    assert [r["threshold"] for r in info["heldout"]["pr_table"]][:3] == [0.05, 0.1, 0.2]
    report = (tmp_path / "a" / "report.md").read_text()
    for section in ("## Held out", "| threshold | precision |", "## False positives", "document length alone",
                    "By document length", "## Held out, each document scored as its highest-scoring paragraph"):
        assert section in report
    pooled = info["heldout"]["max_paragraph"]
    assert summary["max_paragraph_recall"] == round(pooled["recall"], 4) and len(pooled["by_length"]) == 4


def test_the_same_config_writes_the_same_model(signal_model, tmp_path):
    workdir, summary = signal_model
    positive, negative = (os.path.join(os.path.dirname(workdir), name) for name in ("pos.jsonl", "neg.jsonl"))
    again = run_classifier(_classifier_config(positive, negative), str(tmp_path))
    assert again["sha256"] == summary["sha256"]
    assert summary["precision"] >= 0.95 and summary["recall"] >= 0.95, summary


def test_the_report_names_the_planted_word(signal_model):
    workdir, _ = signal_model
    with open(os.path.join(workdir, "classifier.json")) as f:
        info = json.load(f)
    assert info["words"]["positive"][0][0] == SIGNAL


@pytest.mark.parametrize("override, code, message", [
    ("threshold=1.5", 2, "config.threshold must be in (0, 1), got 1.5"),
    ("features.buckets=0", 2, "config.features: FeatureConfig.buckets"),
    ("positive.spec=generated:spam", 2, "no such generated kind"),
    ("negative.spec=EMPTY", 1, "config.negative.spec="),
    ("positive.spec=MISSING", 1, "no such file"),
])
def test_bad_configs_exit_2_and_bad_data_1(override, code, message, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    override = override.replace("EMPTY", str(empty)).replace("MISSING", str(tmp_path / "nope.jsonl"))
    argv = ["classifier", "--config", "configs/classifier.py:smoke", "--workdir", str(tmp_path / "w"),
            f"--config.{override}"]
    assert main(argv) == code
    assert message in capsys.readouterr().err



def test_a_bad_example_file_exits_1_with_one_line_naming_it(bad_file, tmp_path, capsys):
    path = bad_file.write(tmp_path)
    code = main(["classifier", "--config", "configs/classifier.py:smoke", "--workdir", str(tmp_path / "w"),
                 f"--config.positive.spec={path}"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("classifier: ")]
    assert len(lines) == 1 and re.fullmatch("llm-jax classifier: " + bad_file.pattern(path), lines[0]), err
    assert not os.path.exists(tmp_path / "w" / "classifier.npz")

def _prepare(spec: str, workdir: str, *overrides: str) -> dict:
    config = load("configs/prepare.py:smoke", [f"input.spec={spec}", *overrides])
    prepare_stage.run_prepare(config, workdir)
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def prepare_input(tmp_path_factory) -> tuple[str, list[str]]:
    """A jsonl file of CLEAN documents, every fourth with SIGNAL inserted; returns its path and the planted texts."""
    planted, lines = [], []
    for i, text in enumerate(CLEAN):
        if i % 4 == 0:
            words = text.split(" ")
            text = " ".join(words[:2] + [SIGNAL] + words[2:])
            planted.append(text)
        lines.append(json.dumps({"text": text}))
    path = tmp_path_factory.mktemp("raw") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), planted


def test_the_toxicity_step_drops_the_planted_documents(signal_model, prepare_input, tmp_path):
    model = os.path.join(signal_model[0], "classifier.npz")
    spec, planted = prepare_input
    # 0.6, not the model's 0.5: a four-word clean sentence of rare words scores 0.51 (the planted ones 0.69 and up)
    report = _prepare(spec, str(tmp_path), "steps=('toxicity_classifier',)", f"toxicity_classifier.model={model}",
                      "toxicity_classifier.threshold=0.6")
    step = report["steps"][0]
    assert step["step"] == "toxicity_classifier" and step["docs_in"] == len(CLEAN)
    assert step["dropped_by"] == {"toxicity_classifier": len(planted)}
    assert all(SIGNAL in e["text"] and "toxicity" in e["reason"] and ">= threshold 0.6" in e["reason"]
               for e in step["examples"])
    assert step["histograms"]["toxicity"]["n"] == len(CLEAN)
    with open(tmp_path / "prepare.json") as f:
        identity = json.load(f)
    assert len(identity["config"]["toxicity_classifier"]["model_sha256"]) == 64
    with open(tmp_path / "clean" / "shard-00000.jsonl") as f:
        assert not any(SIGNAL in json.loads(line)["text"] for line in f)


def test_the_quality_step_keeps_only_what_scores_above_the_threshold(signal_model, prepare_input, tmp_path):
    model = os.path.join(signal_model[0], "classifier.npz")
    spec, planted = prepare_input
    report = _prepare(spec, str(tmp_path), "steps=('quality_classifier',)", f"quality_classifier.model={model}",
                      "quality_classifier.threshold=0.6")
    step = report["steps"][0]
    assert step["docs_out"] == len(planted) and "quality" in step["histograms"]
    assert "< threshold 0.6" in step["examples"][0]["reason"]


def test_classifier_steps_need_a_model_and_keep_to_it(signal_model, prepare_input, tmp_path):
    spec, _ = prepare_input
    with pytest.raises(ConfigError, match="config.steps has 'quality_classifier' but config.quality_classifier.model "
                                          "is empty"):
        _prepare(spec, str(tmp_path / "a"), "steps=('quality_classifier',)")
    with pytest.raises(ConfigError, match="config.toxicity_classifier.model: classifier file .*nope.npz.* does not"):
        _prepare(spec, str(tmp_path / "a"), "steps=('toxicity_classifier',)",
                 f"toxicity_classifier.model={tmp_path / 'nope.npz'}")
    with pytest.raises(ConfigError, match=r"pooling must be one of \('document', 'max_paragraph'\), got 'mean'"):
        _prepare(spec, str(tmp_path / "a"), "steps=('toxicity_classifier',)",
                 f"toxicity_classifier.model={signal_model[0]}/classifier.npz", "toxicity_classifier.pooling=mean")
    with pytest.raises(ConfigError, match=r"threshold must be None \(the model's own\) or in \[0, 1\], got 3"):
        _prepare(spec, str(tmp_path / "a"), "steps=('toxicity_classifier',)",
                 f"toxicity_classifier.model={signal_model[0]}/classifier.npz", "toxicity_classifier.threshold=3")
    # The same path, another model: the workdir refuses to mix the two preparations.
    model = tmp_path / "model.npz"
    model.write_bytes(open(os.path.join(signal_model[0], "classifier.npz"), "rb").read())
    workdir = str(tmp_path / "b")
    _prepare(spec, workdir, "steps=('toxicity_classifier',)", f"toxicity_classifier.model={model}")
    from llm_jax.data.prepare import classifier
    params = classifier.load_params(str(model))
    classifier.save_classifier(str(model), dict(params, bias=params["bias"] + 1), classifier.load_classifier(
        str(model)).features, 0.5)
    with pytest.raises(ConfigError, match="toxicity_classifier.model_sha256"):
        _prepare(spec, workdir, "steps=('toxicity_classifier',)", f"toxicity_classifier.model={model}")
