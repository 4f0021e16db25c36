"""`llm-jax generate` on a 2-step run: the rows it writes, greedy determinism, cache against no cache, errors."""
import json

import ml_collections
import numpy as np
import pytest

from llm_jax import cli, sharding
from llm_jax.config_lib import load
from llm_jax.data.records import Message, PromptExample
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import RenderedPrompt, batches, generate_file, response_row
from llm_jax.training import run

PROMPTS = [
    {"prompt": "reverse, vaplem bru sia", "task": "reverse"},
    {"prompt": "copy, gaiet bru", "system": "answer briefly", "task": "copy"},
    {"prompt": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "and again"}], "id": 7},
]
ROW_KEYS = {"where", "prompt", "metadata", "response", "tokens", "log_probs", "stopped", "prompt_tokens"}


@pytest.fixture(scope="module")
def run_dir(small_tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = load("configs/pretrain.py:tiny", [
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=128",
        "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=64", "data.batch_size=8",
        "optim.warmup_steps=1", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=1000",
        f"tokenizer.path={small_tokenizer}"])
    run(config, str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def _generate(capsys, run_dir, prompts, out, *flags):
    code = cli.main(["generate", "--run", run_dir, "--prompts", prompts, "--out", str(out),
                     "--max-new-tokens", "8", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    return json.loads(captured.out.strip().splitlines()[-1]), rows


def _fails(capsys, *args):
    code = cli.main(["generate", *args])
    assert code != 0
    return capsys.readouterr().err


def test_generate_writes_one_row_per_prompt(capsys, run_dir, prompts_file, tmp_path):
    summary, rows = _generate(capsys, run_dir, prompts_file, tmp_path / "out.jsonl")
    assert len(rows) == summary["count"] == 3 and summary["step"] == 2
    assert [r["where"] for r in rows] == [f"{prompts_file}:{i}" for i in (1, 2, 3)]
    assert rows[0]["prompt"] == PROMPTS[0]["prompt"] and rows[0]["metadata"] == {"task": "reverse"}
    assert rows[1]["system"] == "answer briefly"
    assert rows[2]["prompt"] == PROMPTS[2]["prompt"] and rows[2]["metadata"] == {"id": 7}
    tokenizer = Tokenizer.load(f"{run_dir}/tokenizer.model")
    for row in rows:
        assert ROW_KEYS <= set(row) and ("gold_score" in row) == ("task" in row["metadata"])
        assert 1 <= len(row["tokens"]) == len(row["log_probs"]) <= 8
        assert all(lp <= 0 for lp in row["log_probs"])
        assert row["stopped"] == (len(row["tokens"]) < 8 or row["tokens"][-1] in (tokenizer.special_id("<|end|>"), 3))
        assert row["response"] == tokenizer.decode(row["tokens"][:-1] if row["stopped"] else row["tokens"])
    assert summary["new_tokens"] == sum(len(r["tokens"]) for r in rows) and summary["tokens_per_s"] > 0
    assert summary["scored"] == 2 and summary["judge"] == "gold"
    assert summary["gold_score"] == pytest.approx(np.mean([r["gold_score"] for r in rows[:2]]))
    assert all(0.0 <= r["gold_score"] <= 1.0 for r in rows[:2])


def test_greedy_is_deterministic_and_the_cache_matches_the_full_forward(capsys, run_dir, prompts_file, tmp_path):
    _, first = _generate(capsys, run_dir, prompts_file, tmp_path / "a.jsonl")
    _, again = _generate(capsys, run_dir, prompts_file, tmp_path / "b.jsonl")
    _, no_cache = _generate(capsys, run_dir, prompts_file, tmp_path / "c.jsonl", "--no-cache")
    # two batches (2 rows, then 1 row padded to 1): rows still land on their own prompts
    summary, batched = _generate(capsys, run_dir, prompts_file, tmp_path / "d.jsonl", "--batch-size", "2")
    assert summary["batches"] == 2
    tokens = [r["tokens"] for r in first]
    assert [r["tokens"] for r in again] == tokens
    assert [r["tokens"] for r in no_cache] == tokens
    assert [r["tokens"] for r in batched] == tokens
    np.testing.assert_allclose([x for r in no_cache for x in r["log_probs"]],
                               [x for r in first for x in r["log_probs"]], atol=1e-5)


def test_a_sharded_model_gives_the_same_answers(capsys, run_dir, prompts_file, tmp_path):
    _, rows = _generate(capsys, run_dir, prompts_file, tmp_path / "a.jsonl")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1, sequence=1)))
    summary = generate_file(run_dir, prompts_file, str(tmp_path / "b.jsonl"),
                            SamplingConfig(max_new_tokens=8, temperature=0.0), mesh=mesh, progress=False)
    assert summary["shapes"] == [(8, 32)]  # 3 prompts filled up to the mesh's 8 batch shards
    assert [json.loads(line)["tokens"] for line in open(tmp_path / "b.jsonl")] == [r["tokens"] for r in rows]


def test_sampling_follows_the_seed(capsys, run_dir, prompts_file, tmp_path):
    flags = ("--temperature", "1.0", "--top-k", "50", "--top-p", "0.95")
    _, a = _generate(capsys, run_dir, prompts_file, tmp_path / "a.jsonl", *flags, "--seed", "1")
    _, b = _generate(capsys, run_dir, prompts_file, tmp_path / "b.jsonl", *flags, "--seed", "1")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]


def test_errors_name_the_run_the_file_and_the_line(capsys, run_dir, prompts_file, tmp_path):
    out = str(tmp_path / "out.jsonl")
    err = _fails(capsys, "--run", str(tmp_path / "nowhere"), "--prompts", prompts_file, "--out", out)
    assert "nowhere" in err and "does not exist" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = _fails(capsys, "--run", run_dir, "--prompts", str(empty), "--out", out, "--max-new-tokens", "8")
    assert f"{empty}: no prompts" in err

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"prompt": "bru " * 100}) + "\n")
    err = _fails(capsys, "--run", run_dir, "--prompts", str(long), "--out", out, "--max-new-tokens", "8")
    assert f"{long}:2:" in err and "max_len=64, the run's context" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    err = _fails(capsys, "--run", run_dir, "--prompts", str(bad), "--out", out, "--max-new-tokens", "8")
    assert f"{bad}:2: missing key 'prompt'" in err

    err = _fails(capsys, "--run", run_dir, "--prompts", prompts_file, "--out", out, "--top-p", "0")
    assert "top_p" in err
    assert not (tmp_path / "out.jsonl").exists()  # nothing written by a failed command


def _rendered(n_tokens, where="f.jsonl:1"):
    example = PromptExample((Message("user", "x"),), {}, where)
    return RenderedPrompt(example, np.arange(2, 2 + n_tokens, dtype=np.int32), False, False)


def test_batches_pad_lengths_to_16_and_a_short_last_batch_to_a_power_of_two():
    prompts = [_rendered(n, f"f:{i}") for i, n in enumerate([3, 17, 5, 4, 2, 9, 1])]
    got = list(batches(prompts, batch_size=4))
    assert [(n, tokens.shape) for n, tokens, _ in got] == [(4, (4, 32)), (3, (4, 16))]
    n, tokens, lengths = got[1]
    assert lengths.tolist() == [2, 9, 1, 2]  # the filler row repeats the batch's first prompt
    np.testing.assert_array_equal(tokens[2], [2] + [0] * 15)
    assert [t.shape for _, t, _ in batches(prompts, batch_size=6, row_multiple=3)] == [(6, 32), (3, 16)]


def test_a_response_ends_before_its_stop_token(small_tokenizer):
    tokenizer = Tokenizer.load(small_tokenizer)
    end = tokenizer.special_id("<|end|>")
    words = tokenizer.encode("bru sia")
    tokens = np.array(words + [end, 0, 0], np.int32)
    row = response_row(_rendered(4), tokens, -np.ones(len(tokens), np.float32), len(words) + 1, (end, 3), tokenizer)
    assert row["stopped"] and row["response"] == "bru sia" and row["tokens"] == words + [end]
    row = response_row(_rendered(4), tokens, -np.ones(len(tokens), np.float32), len(words), (end, 3), tokenizer)
    assert not row["stopped"] and row["response"] == "bru sia" and len(row["log_probs"]) == len(words)


def test_a_plain_prompt_longer_than_the_context_is_cut_from_the_left(capsys, run_dir, tmp_path):
    tokenizer = Tokenizer.load(f"{run_dir}/tokenizer.model")
    long_text = " ".join(["vaplem bru sia"] * 40)  # far more than the run's 64-token context
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": long_text}) + "\n" + json.dumps({"prompt": "bru sia"}) + "\n")
    code = cli.main(["generate", "--run", run_dir, "--prompts", str(path), "--out", str(tmp_path / "out.jsonl"),
                     "--max-new-tokens", "4", "--no-chat-template"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 of 2 prompts did not fit the run's context of 64 tokens" in captured.err and f"{path}:1" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert summary["truncated"] == 1 and rows[0]["prompt_tokens"] == 64 and rows[1]["prompt_tokens"] < 64
    ids = tokenizer.encode_with_specials(long_text)
    ids = ids[:-1] if ids[-1] in tokenizer.eos_ids else ids
    kept = rows[0]["prompt_token_ids"]
    assert kept[0] == tokenizer.bos_id and kept[1:] == ids[-63:]  # the BOS, then the last tokens
