"""The default task: exact gold scores, pairs that respect the margin, disjoint splits, files byte for byte."""
import json
import os
import re

import numpy as np
import pytest

from llm_jax.data import default_corpus, default_task as dt
from llm_jax.data.tokenizer import train_tokenizer

SMALL = {"sft_train": 300, "sft_eval": 50, "preferences_train": 300, "preferences_eval": 50,
         "prompts_train": 100, "prompts_eval": 40}


@pytest.mark.parametrize("prompt, response, score", [
    ("reverse, a b c d", "d c b a", 1.0),
    ("reverse, a b c d", "c d b a", 0.5),        # one swapped pair
    ("reverse, a b c d", "d c b", 0.75),         # a missing word
    ("reverse, a b c d", "d c b a a", 0.8),      # an extra word
    ("reverse, a b c d", "c b a", 0.0),          # dropping the first word shifts the rest
    ("reverse, a b c d", "a b c d", 0.0),        # the wrong task
    ("reverse, a b c", "a b c", 1 / 3),          # ... which still matches the middle word
    ("copy, a b c", "a x c", 2 / 3),             # a substituted word
    ("copy, a b c", " a  b\tc\n", 1.0),          # whitespace between words does not matter
    ("copy, a b c", "A b c", 2 / 3),             # case does
    ("copy, a b", "", 0.0),
    ("first, a b c", "a", 1.0),
    ("first, a b c", "a b c", 1 / 3),
    ("last, a b c", "c c", 0.5),
    ("last, a b c", "a", 0.0),
])
def test_gold_score_by_hand(prompt, response, score):
    assert dt.gold_score(prompt, response) == pytest.approx(score, abs=1e-12)


def test_gold_answer():
    assert dt.gold_answer("copy, vaplem bru sia") == "vaplem bru sia"
    assert dt.gold_answer("reverse, zuma gaiet choo kear") == "kear choo gaiet zuma"
    assert dt.gold_answer("first, plia tus") == "plia"
    assert dt.gold_answer("last, dai romo zisa") == "zisa"
    assert dt.gold_score("reverse, zuma gaiet", dt.gold_answer("reverse, zuma gaiet")) == 1.0


@pytest.mark.parametrize("prompt", ["", "reverse a b", "reverse:  a b", "reverse, ", "reverse,  a b",
                                    "reverse, a  b", "reverse, a b ", "Reverse, a b", "reverse, a, b",
                                    "reverse, a B", "copy\n, a"])
def test_malformed_prompt_is_named(prompt):
    with pytest.raises(ValueError, match="malformed default-task prompt " + re.escape(repr(prompt))):
        dt.gold_score(prompt, "a")


def test_unknown_task_and_bad_types():
    with pytest.raises(ValueError, match=r"'sort, b a' names unknown task 'sort'; known: \['copy'"):
        dt.gold_answer("sort, b a")
    with pytest.raises(ValueError, match="prompt must be a string, got NoneType"):
        dt.gold_answer(None)
    with pytest.raises(ValueError, match="response to 'copy, a' must be a string, got list"):
        dt.gold_score("copy, a", ["a"])


def test_records_follow_the_task_definition():
    tasks, lengths, gold = set(), set(), []
    for r in dt.iter_records("sft_train", 1000):
        task, words = dt.parse_prompt(r["prompt"])
        tasks.add(task)
        lengths.add(len(words))
        assert set(r) == {"prompt", "response"}
        assert len(set(words)) == len(words) and set(words) <= set(dt.TASK_WORDS)
        gold.append(r["response"] == dt.gold_answer(r["prompt"]))
        if not gold[-1]:  # an imperfect demonstration: a corruption of the gold answer, scored below 1
            assert dt.gold_score(r["prompt"], r["response"]) < 1.0
    assert tasks == set(dt.TASKS) and lengths == set(range(dt.MIN_WORDS, dt.MAX_WORDS + 1))
    # SFT_NOISE of the train demonstrations are corrupted (binomial: 4 standard deviations of 1000 draws)
    assert abs((1 - np.mean(gold)) - dt.SFT_NOISE) < 4 * np.sqrt(dt.SFT_NOISE * (1 - dt.SFT_NOISE) / 1000)
    for r in dt.iter_records("sft_eval", 200):  # eval demonstrations are the gold answers
        assert r["response"] == dt.gold_answer(r["prompt"])
    for r in dt.iter_records("prompts_eval", 100):
        assert set(r) == {"prompt", "task"} and dt.parse_prompt(r["prompt"])[0] == r["task"]


def test_pairs_clear_the_margin():
    n_gold = n = 0
    for name in ("preferences_train", "preferences_eval"):
        for r in dt.iter_records(name, 1000):
            chosen, rejected = dt.gold_score(r["prompt"], r["chosen"]), dt.gold_score(r["prompt"], r["rejected"])
            assert chosen >= rejected + dt.MARGIN - 1e-9, r
            # a train pair whose chosen answer is flawed carries the gold answer as its edit; eval pairs none
            edited = name == "preferences_train" and r["chosen"] != dt.gold_answer(r["prompt"])
            assert set(r) == {"prompt", "chosen", "rejected"} | ({"edited"} if edited else set()), r
            if edited:
                assert r["edited"] == dt.gold_answer(r["prompt"]) and 1 - chosen >= 1 / 6 - 1e-9, r
            assert r["chosen"].split() and r["rejected"].split()  # never an empty answer
            n_gold += r["chosen"] == dt.gold_answer(r["prompt"])
            n += 1
    # The gold answer is chosen in about two thirds of the pairs: half by draw, more because the margin rejects
    # more corrupted-vs-corrupted draws than gold-vs-corrupted ones.
    assert 0.55 < n_gold / n < 0.8


def test_splits_are_disjoint_and_records_pure():
    train = {r["prompt"] for name in ("sft_train", "preferences_train", "prompts_train")
             for r in dt.iter_records(name, 2000)}
    held_out = {r["prompt"] for name in ("sft_eval", "preferences_eval", "prompts_eval")
                for r in dt.iter_records(name, 500)}
    assert not train & held_out
    assert len(held_out) > 1000  # many distinct eval prompts, not a handful repeated
    # Record i does not depend on how many are drawn, and the seed changes it.
    first = list(dt.iter_records("preferences_train", 5))
    assert first == list(dt.iter_records("preferences_train", 10))[:5]
    assert first[3] == dt.preference_pair(3, "train")
    assert first != list(dt.iter_records("preferences_train", 5, seed=1))


def test_write_is_deterministic_and_idempotent(tmp_path):
    paths = dt.write_default_task(str(tmp_path / "a"), sizes=SMALL)
    again = dt.write_default_task(str(tmp_path / "b"), sizes=SMALL)
    assert set(paths) == set(dt.DEFAULT_SIZES) | {"stats"}
    for name, path in paths.items():
        assert os.path.dirname(path) == str(tmp_path / "a" / dt.TASK_DIR)
        with open(path, "rb") as f, open(again[name], "rb") as g:
            assert f.read() == g.read(), name
    for name, n in SMALL.items():
        with open(paths[name], encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) == n and [json.loads(line) for line in lines] == list(dt.iter_records(name, n))
    stats = json.loads((tmp_path / "a" / dt.TASK_DIR / dt.STATS_FILE).read_text())
    assert stats["sizes"] == SMALL and stats["baselines"] == dt.baseline_scores(SMALL["prompts_eval"])
    assert not [p for p in os.listdir(tmp_path / "a" / dt.TASK_DIR) if ".tmp." in p]

    # Same arguments: nothing is rewritten. Other arguments, or a damaged stats file: everything is.
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths.values()}
    assert dt.write_default_task(str(tmp_path / "a"), sizes=SMALL) == paths
    assert {p: os.stat(p).st_mtime_ns for p in paths.values()} == mtimes
    dt.write_default_task(str(tmp_path / "a"), seed=1, sizes=SMALL)
    with open(paths["sft_train"], encoding="utf-8") as f:
        assert json.loads(f.readline()) == dt.sft_example(0, "train", seed=1)
    with open(paths["stats"], "w") as f:
        f.write("{")
    dt.write_default_task(str(tmp_path / "a"), sizes=SMALL)
    with open(paths["sft_train"], encoding="utf-8") as f:
        assert json.loads(f.readline()) == dt.sft_example(0, "train")

    with pytest.raises(ValueError, match=r"unknown default-task sizes \['sft'\]"):
        dt.write_default_task(str(tmp_path / "c"), sizes={"sft": 3})
    with pytest.raises(ValueError, match="unknown default-task file 'sft'"):
        next(dt.iter_records("sft"))


def test_baselines():
    scores = dt.baseline_scores(200)
    assert set(scores) == {"empty", "echo", "reverse", "random"}
    assert scores["empty"] == 0.0 and scores["random"] < 0.1
    assert 0.25 < scores["echo"] < 0.5 and 0.25 < scores["reverse"] < 0.5  # right on one task in four, and some


def test_task_text_is_covered_by_the_corpus_tokenizer(tmp_path):
    # A tokenizer trained on the default corpus (as `llm-jax tokenizer` does, on fewer documents) encodes every
    # task word as one piece and never needs the unknown piece or byte fallback for task text.
    docs = [t for t, _ in default_corpus.generate_documents(2000)]
    tok = train_tokenizer(docs, str(tmp_path / "tok.model"), vocab_size=2048)
    assert [len(tok.encode(w)) for w in dt.TASK_WORDS] == [1] * dt.N_TASK_WORDS
    texts = [word for task in dt.TASKS for word in (task, f"{task},")]
    for r in dt.iter_records("preferences_train", 300):
        texts += [r["prompt"], r["chosen"], r["rejected"]]
    for r in dt.iter_records("sft_eval", 300):
        texts += [r["prompt"], r["response"]]
    for ids in tok.encode_batch(texts):
        pieces = [tok.id_to_piece(i) for i in ids]
        assert tok.unk_id not in ids and not [p for p in pieces if p.startswith("<0x")], pieces
