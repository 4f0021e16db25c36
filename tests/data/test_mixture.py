"""Data mixtures and prepared datasets: exact shares, determinism, resume, token shards, tokenizer mismatch, errors."""
import json
import shutil

import numpy as np
import pytest

from llm_jax.config_lib import load
from llm_jax.config_lib import ConfigError
from llm_jax.configs_common import base_config
from llm_jax.data import default_corpus, mixture, pipeline, prepared
from llm_jax.data.prepare import prepare_stage
from llm_jax.data.tokenizer import train_tokenizer

N_DOCS, N_DOMAIN_DOCS = 300, 200


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Small default and domain corpora in a private cache, and a 512-piece tokenizer trained on the default."""
    root = tmp_path_factory.mktemp("mixture")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_JAX_CACHE", str(root / "corpus"))
        mp.setattr(default_corpus, "DEFAULT_N_DOCS", N_DOCS)
        mp.setattr(default_corpus, "DOMAIN_N_DOCS", N_DOMAIN_DOCS)
        docs = [r["text"] for r in default_corpus.iter_default_corpus_records()]
        tok = train_tokenizer(docs, str(root / "tokenizer.model"), vocab_size=512)
        yield dict(root=root, tok=tok, docs=docs)


def mixture_config(replay=0.25, **overrides):
    c = base_config().data
    c.update(dict(seq_len=32, batch_size=8, eval_fraction=0.05, train=""))
    c.mixture.replay = dict(train="default", weight=replay, eval="", eval_fraction=0.05)
    c.mixture.domain = dict(train="default:domain", weight=1.0 - replay)
    c.update(overrides)
    return c


def build(env, config, seed=0, **kw):
    return mixture.build_lm_data(config, env["tok"], cache_dir=str(env["root"] / "cache"), seed=seed, **kw)


def component_rows(env, name, train, eval_fraction=0.05, seed=0):
    """A component's packed rows, built by hand as a single corpus."""
    c = base_config().data
    c.update(dict(seq_len=32, batch_size=8, eval_fraction=eval_fraction, train=train))
    return pipeline.packed_corpus(c, env["tok"], str(env["root"] / "cache"), mixture._component_seed(seed, name))


def rows_of(batches):
    return [r.tobytes() for b in batches for r in b["inputs"]]


def test_shares_are_exact_over_every_period(env):
    data = build(env, mixture_config(0.25))
    replay = set(rows_of([component_rows(env, "replay", "default")[0]]))
    domain = set(rows_of([component_rows(env, "domain", "default:domain")[0]]))
    assert not replay & domain
    it = data.train_iterator()
    rows = rows_of([next(it) for _ in range(100)])  # 800 rows: two periods of 100 + 300
    assert all(r in replay or r in domain for r in rows)
    for period in (rows[:400], rows[400:]):
        assert sum(r in replay for r in period) == 100
    assert data.stats["replay_share"] == 0.25 and data.stats["domain_share"] == 0.75
    assert mixture.integer_proportions([0.3, 0.7]) == [100, 233]


def test_same_seed_same_stream_and_processes_split_it(env):
    a, b = build(env, mixture_config()), build(env, mixture_config())
    first = next(a.train_iterator())
    it_a, it_b = a.train_iterator(), b.train_iterator()
    for _ in range(6):
        np.testing.assert_array_equal(next(it_a)["inputs"], next(it_b)["inputs"])
    other = next(build(env, mixture_config(), seed=1).train_iterator())
    assert not np.array_equal(first["inputs"], other["inputs"])
    # process p takes global rows p, p+P, ...: the two local batches are the halves' interleaving
    whole = build(env, mixture_config()).train_iterator()
    halves = [build(env, mixture_config(), process_index=p, process_count=2).train_iterator() for p in (0, 1)]
    for _ in range(3):
        g, h0, h1 = next(whole)["inputs"], next(halves[0])["inputs"], next(halves[1])["inputs"]
        assert rows_of([{"inputs": g}]) == rows_of([{"inputs": np.stack([h0, h1], 1).reshape(g.shape)}])


def test_resume_mid_stream_gives_the_uninterrupted_batches(env):
    data = build(env, mixture_config())
    it = data.train_iterator()
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = build(env, mixture_config()).train_iterator()  # as a restarted process would
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_eval_sets_are_the_hand_split_components(env):
    data = build(env, mixture_config(0.0))  # replay 0: held out only, yet evaluated
    assert sorted(data.eval_sets) == ["domain", "replay"] and data.eval_weights == {"domain": 1.0}
    for name, train in (("replay", "default"), ("domain", "default:domain")):
        _, eval_rows, stats, _ = component_rows(env, name, train)
        for k, v in eval_rows.items():
            np.testing.assert_array_equal(data.eval_sets[name][k], v)
        assert data.stats[f"{name}_n_eval_rows"] == stats["n_eval_rows"]
    s = data.stats
    assert 0 < s["domain_source_entropy_nats_per_token"] != s["replay_source_entropy_nats_per_token"] > 0
    assert s["source_entropy_nats_per_token"] == s["domain_source_entropy_nats_per_token"]
    assert s["replay_share"] == 0.0
    replay_rows = set(rows_of([data.eval_sets["replay"]]))
    it = data.train_iterator()
    assert not replay_rows & set(rows_of([next(it) for _ in range(10)]))


def test_domain_entropy_floor_matches_scoring_its_documents(env):
    c = base_config().data
    c.update(dict(seq_len=32, batch_size=8, eval_fraction=0.05, train="default:domain"))
    splits, _ = pipeline.tokenize_corpus(c, env["tok"], str(env["root"] / "cache"))
    texts = [env["tok"].decode(d[1:-1]) for d in splits["eval"].docs()]
    nats = -sum(default_corpus.score_document(t, default_corpus.DOMAIN_SPEC) for t in texts)
    stats = pipeline._corpus_stats(splits["train"], splits["eval"], 512)
    assert stats["source_entropy_nats_per_token"] == pytest.approx(nats / splits["eval"].n_targets, rel=1e-9)


def test_the_default_corpus_keeps_its_identity():
    corpus = default_corpus.CORPORA["default"]
    assert corpus.identity()[:3] == ["default", 0, default_corpus.DEFAULT_N_DOCS]
    assert sorted(corpus.identity()[3]) == sorted(
        ["n_topics", "n_nouns", "n_verbs", "n_adjectives", "n_adverbs", "zipf_exponent", "topic_weight",
         "q_paragraph", "q_sentence", "lexicon_seed"])
    domain = default_corpus.build_source(default_corpus.DOMAIN_SPEC)
    assert domain.words == default_corpus.build_source().words  # same lexicon: the tokenizer still fits


@pytest.mark.parametrize("edit, message", [
    (dict(train="default"), r"data.train='default' and data.mixture \(domain, replay\) both name training data"),
    (dict(eval="x.jsonl"), r"data.eval='x.jsonl' is set with data.mixture"),
    (dict(mixture={}), r"data.train is empty and data.mixture names no components"),
    (dict(mixture={"a": {"train": "default", "weight": -1.0}}), r"data.mixture.a.weight must be .* got -1.0"),
    (dict(mixture={"a": {"train": "default", "weight": float("nan")}}), r"data.mixture.a.weight .* got nan"),
    (dict(mixture={"a": {"train": "default", "weight": 0.0}}), r"weights are all 0 \(a=0.0\)"),
    (dict(mixture={"a": {"train": "default", "wieght": 1.0}}), r"data.mixture.a has unknown field\(s\) \['wieght'\]"),
    (dict(mixture={"a": {"train": "", "weight": 1.0}}), r"data.mixture.a.train must name a data spec, got ''"),
    (dict(mixture={"a": 0.5}), r"data.mixture.a must hold fields"),
    (dict(mixture={"a": {"train": "default", "weight": 1.0, "eval_fraction": 1.0}}),
     r"data.mixture.a.eval_fraction must be in \[0, 1\) .* got 1.0"),
])
def test_bad_mixtures_are_refused_by_name(edit, message):
    c = mixture_config()
    if "mixture" in edit:
        c.mixture = edit.pop("mixture")
    c.update(edit)
    with pytest.raises(ConfigError, match=message):
        mixture.components(c)


def test_a_tokenizer_trains_on_every_component():
    assert mixture.training_spec(mixture_config()) == "default:domain,default"
    assert mixture.training_spec(base_config().data) == "default"


def test_weights_override_from_the_command_line():
    config = load("configs/continued_pretrain.py:size=tiny,replay=0.5", ["data.mixture.domain.weight=1.5"])
    assert {c.name: c.weight for c in mixture.components(config.data)} == {"domain": 0.75, "replay": 0.25}


# ------------------------------------------------------------------------------------------- prepared datasets

def _prepare(env, workdir, tokenizer="", *overrides):
    raw = env["root"] / "raw"
    if not raw.exists():
        raw.mkdir()
        for i in range(3):
            (raw / f"part-{i}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in env["docs"][i * 40:(i + 1) * 40]))
    config = load("configs/prepare.py:smoke", [f"input.spec={raw}/part-*.jsonl", f"output.tokenizer={tokenizer}",
                                               "steps=('exact_dedup',)", *overrides])
    prepare_stage.run_prepare(config, str(workdir))
    return str(workdir)


def _prepared_config(spec, **kw):
    c = base_config().data
    c.update(dict(dict(seq_len=32, batch_size=8, eval_fraction=0.2, train=spec), **kw))
    return c


def _assert_splits_equal(a, b):
    for name in ("train", "eval"):
        np.testing.assert_array_equal(a[name].tokens, b[name].tokens)
        np.testing.assert_array_equal(a[name].offsets, b[name].offsets)


def test_prepared_token_shards_equal_tokenizing_its_clean_text(env, tmp_path, monkeypatch, capsys):
    workdir = _prepare(env, tmp_path / "prep", env["tok"].path)
    cache = str(tmp_path / "cache")
    called, tokenize = [], pipeline._tokenize
    monkeypatch.setattr(pipeline, "_tokenize", lambda *a: called.append(1) or tokenize(*a))
    from_tokens, path = pipeline.tokenize_corpus(_prepared_config(workdir), env["tok"], cache)
    assert not called and path == workdir  # read from the shards: nothing tokenized
    assert from_tokens["train"].n_docs + from_tokens["eval"].n_docs == 120 and from_tokens["eval"].n_docs > 0
    # the same workdir without its token shards: the clean jsonl, tokenized here, gives the same split
    text_only = shutil.copytree(workdir, tmp_path / "text_only")
    shutil.rmtree(text_only / "tokens")
    from_text, _ = pipeline.tokenize_corpus(_prepared_config(str(text_only)), env["tok"], cache)
    assert called
    _assert_splits_equal(from_tokens, from_text)
    assert "tokenizing its cleaned text" in capsys.readouterr().err
    # and every document is the clean jsonl's, tokenized as any file is
    clean, _ = pipeline.tokenize_corpus(_prepared_config(f"{workdir}/clean/*.jsonl", eval_fraction=0.0),
                                        env["tok"], cache)
    both = pipeline.concatenate([from_tokens["train"], from_tokens["eval"]])
    assert sorted(d.tobytes() for d in both.docs()) == sorted(d.tobytes() for d in clean["train"].docs())


def test_a_prepared_dataset_of_another_tokenizer(env, tmp_path):
    other = train_tokenizer(env["docs"][:100], str(tmp_path / "other.model"), vocab_size=400)
    workdir = _prepare(env, tmp_path / "prep", other.path)
    cache = str(tmp_path / "cache")
    splits, _ = pipeline.tokenize_corpus(_prepared_config(workdir), env["tok"], cache)  # falls back to the text
    decoded = sorted(env["tok"].decode(d[1:-1]) for d in splits["train"].docs() + splits["eval"].docs())
    assert decoded == sorted(env["docs"][:120])
    tokens_only = _prepare(env, tmp_path / "tokens_only", other.path, "output.jsonl=false")
    with pytest.raises(prepared.PreparedDataError, match=f"sha256 {other.sha256}.*sha256 {env['tok'].sha256}"):
        pipeline.tokenize_corpus(_prepared_config(tokens_only), env["tok"], cache)


def test_hosts_write_one_workdir_that_reads_whole(env, tmp_path):
    single = _prepare(env, tmp_path / "single", env["tok"].path)
    hosts = tmp_path / "hosts"
    # Each host dedups its own files, so host 0 finishes without waiting for host 1 (its corpus has no copies).
    _prepare(env, hosts, env["tok"].path, "host_index=0", "host_count=2", "dedup_scope=host")
    with pytest.raises(prepared.PreparedDataError, match="1 of 3 shards have no done marker.*shard-00001"):
        pipeline.tokenize_corpus(_prepared_config(str(hosts)), env["tok"], str(tmp_path / "cache"))
    _prepare(env, hosts, env["tok"].path, "host_index=1", "host_count=2", "dedup_scope=host")
    cache = str(tmp_path / "cache")
    _assert_splits_equal(pipeline.tokenize_corpus(_prepared_config(str(hosts)), env["tok"], cache)[0],
                         pipeline.tokenize_corpus(_prepared_config(single), env["tok"], cache)[0])


def test_a_prepared_dataset_as_a_mixture_component(env, tmp_path):
    workdir = _prepare(env, tmp_path / "prep", env["tok"].path)
    c = mixture_config()
    c.mixture.domain.train = workdir
    data = build(env, c)
    assert data.stats["domain_n_train_docs"] + data.stats["domain_n_eval_docs"] == 120
    assert "domain_source_entropy_nats_per_token" not in data.stats  # its source is unknown
    with pytest.raises(Exception, match="mixes prepared workdirs"):
        pipeline.tokenize_corpus(_prepared_config(f"{workdir},default"), env["tok"], str(tmp_path / "cache"))
