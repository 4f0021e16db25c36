"""The research notebooks run end to end, as a researcher would run them, and are stored without outputs.

The kernel is the `python3` kernelspec that ipykernel installs with itself (share/jupyter/kernels/python3;
jupyter_client also falls back to ipykernel's own copy), and its `python` is this interpreter, so the
notebooks import the llm_jax under test and nothing is installed at run time.
"""
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from llm_jax.train.metrics import read_metrics
from llm_jax.train.run_record import read_run_config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
QUICKSTART_STEPS = 30
ATTENTION_STEPS = 100


def _execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Run from notebooks/, where Jupyter would start the kernel. The kernel inherits this process's
    # environment, including conftest's XLA_FLAGS (8 emulated CPU devices) and JAX_PLATFORMS=cpu: we keep
    # them, because the pretrain configs use mesh data=-1 (any device count that divides the batch), so the
    # notebook runs the same data-parallel path as the rest of the suite, on CPU wherever the suite runs.
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
    workdir = tmp_path / "quickstart"
    monkeypatch.setenv("QUICKSTART_STEPS", str(QUICKSTART_STEPS))
    monkeypatch.setenv("QUICKSTART_WORKDIR", str(workdir))
    nb = _execute("quickstart.ipynb")

    metrics = read_metrics(str(workdir))
    stats = metrics[0]
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert stats["step"] == 0 and train[-1]["step"] == evals[-1]["step"] == QUICKSTART_STEPS
    # 30 steps (the warmup of the tiny config) are enough to learn a lot: the first logged loss (step 10) is
    # ~7.0 nats, the last ~5.0, and held-out loss (~5.0) is already below the unigram baseline (~5.66), i.e.
    # the model uses context. It cannot beat the source's entropy (~2.5), which would mean a leaky split.
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, (train[0], train[-1])
    assert stats["source_entropy_nats_per_token"] < evals[-1]["eval_loss"] < stats["unigram_cross_entropy_nats"]

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot was not displayed"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "unigram baseline" in printed and "source entropy floor" in printed
    assert "pieces:" in printed


@pytest.mark.slow
def test_scaling_laws(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_BOOTSTRAP", "50")
    monkeypatch.setenv("SCALING_PLOTS", str(tmp_path / "plots"))
    nb = _execute("scaling_laws.ipynb")

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "loss_vs_compute.png", "isoflops.png", "fitted_law.png", "kaplan_laws.png"}
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "24 runs, 6 sizes" in printed and "E − entropy floor" in printed
    assert "predicted held-out loss" in printed
    assert "llm-jax train --config configs/pretrain.py:size=depth" in printed


@pytest.mark.slow
def test_attention_notebook(tmp_path, monkeypatch):
    workdir, saved = tmp_path / "attention", tmp_path / "weights.npz"
    monkeypatch.setenv("ATTENTION_STEPS", str(ATTENTION_STEPS))
    monkeypatch.setenv("ATTENTION_WORKDIR", str(workdir))
    monkeypatch.setenv("ATTENTION_OUT", str(saved))
    nb = _execute("attention.ipynb")

    assert read_metrics(str(workdir))[-1]["step"] == ATTENTION_STEPS
    model = read_run_config(str(workdir)).model
    found = np.load(saved)
    weights, pieces, noun, pronoun = found["weights"], list(found["pieces"]), found["noun"], int(found["pronoun"])
    t = len(pieces)
    assert weights.shape == (model.n_layers, model.n_heads, t, t) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert (weights[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0).all()
    assert pieces[0] == "<s>" and "▁its".endswith(pieces[pronoun]) and 0 < noun.min() <= noun.max() < pronoun

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the grid and the chosen head
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    # The head it names is the one whose pronoun row weighs the noun most, with the weight the file holds.
    layer, head, weight = re.search(r"most: layer (\d+) head (\d+), ([\d.]+) of the pronoun", printed).groups()
    onto_noun = weights[:, :, pronoun][..., noun].sum(-1)
    assert (int(layer), int(head)) == np.unravel_index(onto_noun.argmax(), onto_noun.shape)
    assert float(weight) == pytest.approx(onto_noun.max(), abs=5e-4)
    assert re.search(r"over \d+ sentences: layer \d head \d puts the most on the noun", printed)
