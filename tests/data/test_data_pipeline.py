"""The LM data pipeline: determinism, caching, exact resume through orbax, multi-process sharding, eval."""
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm_jax.configs_common import base_config
from llm_jax.data import default_corpus, mixture, pipeline
from llm_jax.data.packing import PACKED_KEYS
from llm_jax.data.tokenizer import train_tokenizer

N_DOCS = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small default corpus in a private cache, and a 512-piece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_JAX_CACHE", str(root / "corpus"))
        mp.setattr(default_corpus, "DEFAULT_N_DOCS", N_DOCS)
        docs = [r["text"] for r in default_corpus.iter_default_corpus_records()]
        tok = train_tokenizer(docs, str(root / "tokenizer.model"), vocab_size=512)
        yield dict(root=root, tok=tok)


def data_config(**overrides):
    c = base_config().data
    c.update(dict(seq_len=32, batch_size=8, eval_fraction=0.05))
    c.update(overrides)
    return c


def build(env, *, seed=0, cache="cache", **kw):
    config = kw.pop("config", None) or data_config()
    return mixture.build_lm_data(config, env["tok"], cache_dir=str(env["root"] / cache), seed=seed, **kw)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(PACKED_KEYS)
        for k in PACKED_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_shapes_and_stats(env):
    data = build(env)
    batch = next(data.train_iterator())
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 32), np.int32), "targets": ((8, 32), np.int32), "segment_ids": ((8, 32), np.int32),
        "positions": ((8, 32), np.int32), "loss_mask": ((8, 32), np.float32)}
    s = data.stats
    assert all(isinstance(v, (int, float)) for v in s.values())
    assert s["n_train_docs"] + s["n_eval_docs"] == N_DOCS and s["n_eval_docs"] > 0
    assert s["n_train_rows"] * 32 >= s["n_train_tokens"] > (s["n_train_rows"] - 1) * 32
    # The source's entropy floor is far below a unigram model, as it must be for a learnable corpus.
    assert 0 < s["source_entropy_nats_per_token"] < s["unigram_cross_entropy_nats"]
    assert s["eval_unigram_entropy_nats"] <= s["unigram_cross_entropy_nats"]


def test_source_entropy_matches_scoring_the_decoded_eval_documents(env):
    data = build(env)
    split = pipeline.tokenize_corpus(data_config(), env["tok"], str(env["root"] / "cache"))[0]["eval"]
    texts = [env["tok"].decode(d[1:-1]) for d in split.docs()]
    nats = -sum(default_corpus.score_document(t) for t in texts)
    assert data.stats["source_entropy_nats_per_token"] == pytest.approx(nats / split.n_targets, rel=1e-9)


def test_same_seed_same_batches_other_seed_other_batches(env):
    a = take(build(env, seed=0).train_iterator(), 4)
    assert_batches_equal(a, take(build(env, seed=0).train_iterator(), 4))
    b = take(build(env, seed=1).train_iterator(), 4)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])


def test_epochs_cover_every_row_in_a_new_order(env):
    data = build(env, config=data_config(batch_size=1))
    n = data.stats["n_train_rows"]
    rows = [b["inputs"][0].tobytes() for b in take(data.train_iterator(), 2 * n)]
    assert sorted(rows[:n]) == sorted(rows[n:])
    assert rows[:n] != rows[n:]


def test_cache_is_reused_and_keyed(env, monkeypatch):
    first = build(env, cache="cache_reuse")
    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")
    monkeypatch.setattr(pipeline, "_tokenize", fail)
    again = build(env, cache="cache_reuse")
    assert again.stats == first.stats
    assert_batches_equal(take(first.train_iterator(), 2), take(again.train_iterator(), 2))
    monkeypatch.undo()
    other = build(env, cache="cache_reuse", config=data_config(eval_fraction=0.1))
    assert other.cache_path != first.cache_path
    assert sorted(os.listdir(env["root"] / "cache_reuse")) == sorted(
        os.path.basename(d.cache_path) for d in (first, other))


def test_iterator_state_round_trip(env):
    data = build(env)
    it = data.train_iterator()
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    fresh = data.train_iterator()
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_orbax_checkpoint_resumes_exactly(env, tmp_path):
    data = build(env)
    it = data.train_iterator()
    take(it, 5)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 4)

    resumed = build(env).train_iterator()  # as a restarted process would
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        assert manager.latest_step() == 5
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_batches_equal(take(resumed, 4), expected)


def test_processes_split_each_global_batch(env):
    single = build(env).train_iterator()
    p0 = build(env, process_index=0, process_count=2)
    p1 = build(env, process_index=1, process_count=2)
    assert p0.local_batch_size == 4
    it0, it1 = p0.train_iterator(), p1.train_iterator()
    n_rows = p0.stats["n_train_rows"]
    seen0, seen1 = [], []
    for _ in range(n_rows // 8):
        g, a, b = next(single), next(it0), next(it1)
        rows = lambda batch: {r.tobytes() for r in batch["inputs"]}
        assert rows(a) | rows(b) == rows(g) and not rows(a) & rows(b)
        seen0 += rows(a)
        seen1 += rows(b)
    assert not set(seen0) & set(seen1)  # within an epoch the processes never share a row


def test_eval_batches(env):
    data = build(env)
    n_eval_rows = data.stats["n_eval_rows"]
    batches = data.eval_batches(100)
    assert len(batches) == -(-n_eval_rows // 8)
    assert all(b["inputs"].shape == (8, 32) for b in batches)
    assert sum(b["loss_mask"].sum() for b in batches) == data.stats["n_eval_tokens"]
    assert_batches_equal(batches, build(env, seed=3).eval_batches(100))  # independent of the train seed
    assert len(data.eval_batches(1)) == 1
    # Two processes: disjoint halves of every global eval batch.
    halves = [build(env, process_index=p, process_count=2).eval_batches(100) for p in (0, 1)]
    for g, a, b in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([a["inputs"], b["inputs"]]), g["inputs"])


def test_separate_eval_source(env, tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "The eval set."}\n{"text": "Another one."}\n')
    data = build(env, cache="cache_eval", config=data_config(eval=str(path)))
    assert data.stats["n_eval_docs"] == 2 and data.stats["n_train_docs"] == N_DOCS
    assert "source_entropy_nats_per_token" not in data.stats  # the eval file's source is unknown
    (batch,) = data.eval_batches(8)
    assert batch["loss_mask"][1:].sum() == 0  # everything fits the first row; the rest is padding


def test_errors(env):
    with pytest.raises(ValueError, match="data.batch_size=6 is not divisible by process_count=4"):
        build(env, config=data_config(batch_size=6), process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"fewer than one batch \(data.batch_size=100000\)"):
        build(env, config=data_config(batch_size=100_000))
    with pytest.raises(ValueError, match=r"data.eval_fraction must be in \[0, 1\) when data.eval is empty, got 1.5"):
        build(env, cache="cache_bad_fraction", config=data_config(eval_fraction=1.5))
    with pytest.raises(ValueError, match="no eval documents"):
        build(env, cache="cache_no_eval", config=data_config(eval_fraction=0.0)).eval_batches(1)
