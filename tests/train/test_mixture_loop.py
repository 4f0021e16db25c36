"""A mixture run end to end: per-component eval metrics, exact resume, and evals equal to a hand-split corpus's."""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm_jax.config_lib import ConfigError
from llm_jax.data import default_corpus
from llm_jax.training import run
from llm_jax.train.run_record import ResumeMismatch
from llm_jax.train.metrics import format_line, read_metrics

MIXTURE = ("data.mixture={'replay': {'train': 'default', 'weight': 0.25, 'eval_fraction': 0.05}, "
           "'domain': {'train': 'default:domain', 'weight': 0.75, 'eval_fraction': 0.05}}")


@pytest.fixture(scope="module")
def small_corpora(small_tokenizer, tmp_path_factory):
    """Small default and domain corpora in a private cache (the shared tokenizer is made first, on the real one),
    and one tokenized-corpus cache for every run of this module."""
    root = tmp_path_factory.mktemp("mixture_corpora")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_JAX_CACHE", str(root / "corpus"))
        mp.setattr(default_corpus, "DEFAULT_N_DOCS", 300)
        mp.setattr(default_corpus, "DOMAIN_N_DOCS", 200)
        yield f"data.cache_dir={root / 'cache'}"


@pytest.fixture(scope="module")
def runs_of_this_module(tmp_path_factory):
    return dict(root=tmp_path_factory.mktemp("mixture_runs"))


@pytest.fixture
def mixture_run(small_corpora, small_config, runs_of_this_module):
    """(workdir, config maker) of one 8-step mixture run, made by the first test that asks and shared after."""
    def config(*extra):
        return small_config(small_corpora, *extra)
    workdir = runs_of_this_module["root"] / "run"
    if not workdir.exists():
        run(config("data.train=", MIXTURE), str(workdir))
    return workdir, config


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def _params(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def test_each_component_is_evaluated_and_the_overall_loss_is_their_weighted_mean(mixture_run):
    workdir, _ = mixture_run
    metrics = read_metrics(workdir)
    first = metrics[0]
    assert first["replay_share"] == 0.25 and first["domain_share"] == 0.75
    floors = {name: first[f"{name}_source_entropy_nats_per_token"] for name in ("replay", "domain")}
    assert first["source_entropy_nats_per_token"] == pytest.approx(0.25 * floors["replay"] + 0.75 * floors["domain"])
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8]
    for m in evals:
        assert m["eval_loss"] == pytest.approx(0.25 * m["eval_replay_loss"] + 0.75 * m["eval_domain_loss"])
        assert m["eval_domain_perplexity"] == pytest.approx(np.exp(m["eval_domain_loss"]))
        assert "eval_replay_accuracy" in m and "eval_perplexity" in m


def test_a_resumed_mixture_run_continues_bit_for_bit(mixture_run, tmp_path):
    workdir, config = mixture_run
    cut = tmp_path / "cut"
    shutil.copytree(workdir, cut)
    shutil.rmtree(cut / "checkpoints" / "8")  # killed before its final save: resumes from step 4
    summary = run(config("data.train=", MIXTURE), str(cut))
    assert summary["start_step"] == 4
    assert _losses(cut) == _losses(workdir)
    jax.tree.map(np.testing.assert_array_equal, _params(cut, 8), _params(workdir, 8))


def test_a_component_eval_equals_the_eval_of_its_corpus_alone(mixture_run, tmp_path):
    workdir, config = mixture_run
    # lr 0 from the mixture run's final params: this run evaluates exactly those params on the domain corpus alone,
    # held out by the same hash and fraction.
    summary = run(config(f"train.init_from={workdir}", "optim.lr=0.0", "train.steps=1", "data.train=default:domain",
                         "data.eval_fraction=0.05"), str(tmp_path / "alone"))
    final = [m for m in read_metrics(workdir) if m.get("step") == 8 and "eval_loss" in m][-1]
    assert summary["eval_loss"] == pytest.approx(final["eval_domain_loss"], rel=1e-6)


def test_resuming_with_another_mixture_is_refused(mixture_run):
    workdir, config = mixture_run
    with pytest.raises(ResumeMismatch, match=r"would change \(data.mixture.domain.weight: .* in the run, 0.5 now"):
        run(config("data.train=", MIXTURE, "data.mixture.domain.weight=0.5"), str(workdir))


def test_a_bad_mixture_fails_before_anything_is_built(small_config, tmp_path):
    with pytest.raises(ConfigError, match=r"data.train='default' and data.mixture \(a\) both name training data"):
        run(small_config("data.mixture={'a': {'train': 'default', 'weight': 1.0}}"), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_the_console_line_shows_each_components_eval_loss():
    line = format_line(50, 100, {"loss": 2.5, "eval_loss": 2.75, "eval_perplexity": 15.6, "eval_replay_loss": 3.0,
                                 "eval_domain_loss": 2.5, "eval_domain_perplexity": 12.2, "lr": 1e-3})
    assert line == ("step 50/100  loss 2.5000  eval_loss 2.7500  eval_replay_loss 3.0000  eval_domain_loss 2.5000  "
                    "eval_perplexity 15.60  lr 1.00e-03")
