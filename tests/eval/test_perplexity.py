"""Perplexity (llm_jax/eval/perplexity.py) on a tiny saved run: against a plain forward pass and log-softmax over
each document, filler rows and batch size that change nothing, mixtures weighted by tokens, the held-out split, a
sharded mesh, and every bad input named."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import runs, sharding
from llm_jax.data.pipeline import eval_membership
from llm_jax.data.sources import DataError
from llm_jax.eval.perplexity import perplexity, texts
from llm_jax.model.transformer import Transformer
from llm_jax.train.checkpoint import CheckpointError
from llm_jax.train.run_record import read_run_config

SHORT = ["the sun", "a red house by the sea", "we walked"]
WORDS = "the of and a to in is was he for it with as his on be at by had are but from or have an they which".split()


@pytest.fixture(scope="module")
def run_dir(small_tokenizer, tmp_path_factory):
    """A fresh pretraining model (seq_len 48) with its weights scaled up, so its predictions are far from uniform;
    data.eval_fraction=0.5 holds out about half of any text."""
    from run_fixtures import RL_MODEL_OVERRIDES, save_run
    return save_run(tmp_path_factory.mktemp("ppl") / "pre", "configs/pretrain.py:tiny", small_tokenizer,
                    lambda p: jax.tree.map(lambda x: 3 * x, p),
                    overrides=RL_MODEL_OVERRIDES + ["data.eval_fraction=0.5"])


@pytest.fixture(scope="module")
def run(run_dir):
    return runs.load_run(run_dir)


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _long_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) for _ in range(n)]


def _hand_nll(run, docs, width=48):
    """(Σ −log p(target), number of targets), each document alone through a plain forward pass (right-padded to
    one width: causal attention keeps the padding from mattering, and one compilation serves every document)."""
    logits_fn = jax.jit(lambda ids_bt: run.model.apply(run.params, ids_bt, method=Transformer.logits))
    nll, n = 0.0, 0
    for doc in docs:
        ids = [run.tokenizer.bos_id, *run.tokenizer.encode(doc), run.tokenizer.eos_id]
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(ids) - 1] = ids[:-1]
        log_p_tv = np.asarray(jax.nn.log_softmax(logits_fn(padded)[0].astype(jnp.float32)), np.float64)
        nll -= sum(log_p_tv[t, ids[t + 1]] for t in range(len(ids) - 1))
        n += len(ids) - 1
    return nll, n


def test_loss_is_the_mean_negative_log_likelihood_of_every_target(run_dir, run, tmp_path):
    result = perplexity(run_dir, _jsonl(tmp_path / "short.jsonl", SHORT), batch_size=4, cache_dir=str(tmp_path))
    assert result["rows"] == 1  # every document whole in one row: its context is itself, as in the hand pass
    nll, n = _hand_nll(run, SHORT)
    assert result["tokens"] == n and result["batches"] == 1
    assert result["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert abs(result["loss"] - math.log(512)) > 0.5 and result["step"] == 1 and result["data"].endswith("short.jsonl")


def test_batch_size_and_filler_rows_change_nothing_and_max_batches_caps(run_dir, tmp_path):
    spec = _jsonl(tmp_path / "long.jsonl", _long_docs(20, 0))
    one = perplexity(run_dir, spec, batch_size=1, cache_dir=str(tmp_path))
    eight = perplexity(run_dir, spec, batch_size=8, cache_dir=str(tmp_path))
    assert one["rows"] == eight["rows"] > 8 and eight["batches"] == -(-eight["rows"] // 8)
    assert one["tokens"] == eight["tokens"]
    assert one["loss"] == pytest.approx(eight["loss"], rel=1e-5)
    capped = perplexity(run_dir, spec, batch_size=2, max_batches=1, cache_dir=str(tmp_path))
    assert capped["batches"] == 1 and capped["rows"] == 2 and capped["tokens"] <= 2 * 48


def test_a_mixture_scores_each_component_and_weights_the_overall_loss_by_tokens(run_dir, tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl", _long_docs(12, 1)), _jsonl(tmp_path / "b.jsonl", SHORT)
    result = perplexity(run_dir, {"long": a, "short": b}, cache_dir=str(tmp_path))
    for name, spec in (("long", a), ("short", b)):
        alone = perplexity(run_dir, spec, cache_dir=str(tmp_path))
        part = result["components"][name]
        assert part["spec"] == spec and part["tokens"] == alone["tokens"]
        assert part["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    parts = result["components"].values()
    assert result["tokens"] == sum(p["tokens"] for p in parts)
    weighted = sum(p["tokens"] * p["loss"] for p in parts) / result["tokens"]
    assert result["loss"] == pytest.approx(weighted, rel=1e-6)


def test_the_eval_split_is_the_documents_the_runs_config_holds_out(run_dir, run, tmp_path):
    docs = SHORT + ["one more", "and another", "a last one here"]
    held = [d for d, h in zip(docs, eval_membership(docs, 0.5)) if h]
    assert 0 < len(held) < len(docs)
    result = perplexity(run_dir, _jsonl(tmp_path / "docs.jsonl", docs), split="eval", cache_dir=str(tmp_path))
    nll, n = _hand_nll(run, held)
    assert result["split"] == "eval" and result["tokens"] == n
    assert result["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_the_runs_own_mixture_is_what_none_scores():
    from llm_jax.config_lib import load
    config = load("configs/continued_pretrain.py:tiny", [])
    assert sorted((t.name, t.spec) for t in texts(config, None)) == [("domain", "default:domain"), ("replay", "default")]
    config.data.mixture = {}
    config.data.train = "notes.txt"
    assert [(t.name, t.spec) for t in texts(config, None)] == [("", "notes.txt")]


def test_on_a_mesh_of_eight_devices_the_loss_is_the_same(run_dir, tmp_path):
    spec = _jsonl(tmp_path / "long.jsonl", _long_docs(20, 2))
    mesh = sharding.make_mesh(read_run_config(run_dir).mesh)
    assert mesh.devices.size == 8
    sharded = perplexity(run_dir, spec, batch_size=8, mesh=mesh, cache_dir=str(tmp_path))
    single = perplexity(run_dir, spec, batch_size=8, cache_dir=str(tmp_path))
    assert sharded["tokens"] == single["tokens"]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-4)
    with pytest.raises(ValueError, match=r"batch_size=4 does not divide over the mesh's 8 batch shards"):
        perplexity(run_dir, spec, batch_size=4, mesh=mesh, cache_dir=str(tmp_path))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(data_spec=""), ValueError, "the data spec is empty"),
    (dict(data_spec={}), ValueError, r"got \{\}"),
    (dict(data_spec={"web": ""}), ValueError, "component 'web' must name a data spec"),
    (dict(data_spec="nowhere/*.jsonl"), DataError, "nowhere"),
    (dict(data_spec="default", batch_size=0), ValueError, "batch_size must be ≥ 1, got 0"),
    (dict(data_spec="default", max_batches=0), ValueError, "max_batches must be ≥ 1"),
    (dict(data_spec="default", split="test"), ValueError, "split must be one of"),
])
def test_bad_inputs_are_named(run_dir, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        perplexity(run_dir, cache_dir=str(tmp_path), **kwargs)


def test_a_missing_run_a_reward_run_and_an_empty_split_are_named(run_dir, small_tokenizer, tmp_path):
    from run_fixtures import save_run
    with pytest.raises(CheckpointError, match="no_such_run"):
        perplexity(str(tmp_path / "no_such_run"), "default")
    rm = save_run(tmp_path / "rm", "configs/reward.py:tiny", small_tokenizer, lambda p: p)
    with pytest.raises(ValueError, match=r"rm is a 'reward' run, whose model does not predict tokens"):
        perplexity(rm, "default")
    kept = next(d for d in ("the sun", "we walked", "a cat", "one more") if not eval_membership([d], 0.5)[0])
    spec = _jsonl(tmp_path / "one.jsonl", [kept])
    with pytest.raises(DataError, match=r"data spec '.*one.jsonl' has no tokens to score in split 'eval' "
                                        r"\(eval_fraction=0.5\)"):
        perplexity(run_dir, spec, split="eval", cache_dir=str(tmp_path))
