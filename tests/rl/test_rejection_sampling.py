"""`llm-jax rejection-sample`: the reward model's best of K samples is kept, the threshold drops, the output
follows the seed and loads as SFT data; runs that do not fit together fail naming them.

The runs are freshly initialised models saved as checkpoints (no training; tests/conftest.py `tiny_rl_runs`). The
policy's params are set so that every step emits <|end|> with probability about 0.17 and otherwise a uniform token:
samples differ, some stop and some run to max_new_tokens. The reward model has a random head, so its rewards
differ between answers."""
import json
import os
import shutil

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from llm_jax import cli
from llm_jax.data import chat
from llm_jax.data.records import iter_sft_examples, sft_example
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.eval.judges import JudgeError
from llm_jax.generate import SamplingConfig
from llm_jax.objectives.reward import RewardScorer
from llm_jax.rl.rejection_sampling import rejection_sample

PROMPTS = [
    {"prompt": "reverse, vaplem bru sia", "task": "reverse"},
    {"prompt": "copy, gaiet bru", "system": "answer briefly", "task": "copy"},
    {"prompt": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "and again"}], "id": 7},
    {"prompt": "first, zuma kear"},
]
K = 6
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return Tokenizer.load(small_tokenizer)


@pytest.fixture(scope="module")
def runs(tiny_rl_runs):
    return tiny_rl_runs


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _messages(record):
    """The prompt's messages as records.py reads them from an SFT record (without its answer)."""
    return sft_example(dict(record, response=record.get("response", "")), "record").messages[:-1]


def test_the_reward_models_best_of_k_is_kept(runs, prompts_file, tokenizer, tmp_path, monkeypatch):
    """With a stub reward (a known function of the scored tokens), each kept answer is its prompt's argmax."""
    policy, rm = runs
    seen = []  # (sequence, reward) of every candidate scored

    def stub_score_tokens(self, sequences, response_starts):
        assistant = tokenizer.special_id("<|assistant|>")
        assert all(s[start - 1] == assistant for s, start in zip(sequences, response_starts))
        rewards = np.array([len(s) + (int(s[-3]) % 97) / 97 for s in sequences], np.float32)
        seen.extend(zip((tuple(int(t) for t in s) for s in sequences), rewards))
        return rewards

    monkeypatch.setattr(RewardScorer, "score_tokens", stub_score_tokens)
    out = tmp_path / "rs" / "sft.jsonl"
    summary = rejection_sample(policy, rm, prompts_file, str(out), K, SAMPLING, batch_size=8, seed=0,
                               progress=False)
    kept = _read(out)

    assert summary["count"] == len(PROMPTS) and summary["samples"] == len(PROMPTS) * K
    assert summary["kept"] == len(kept) and summary["dropped_by_threshold"] == 0
    assert summary["kept"] + summary["no_candidate"] == len(PROMPTS)
    assert summary["candidates"] == len(seen)
    assert summary["candidates"] + summary["reserved_symbol"] + summary["too_long_for_reward"] == summary["stopped"]
    assert 0 < summary["stopped"] < summary["samples"]  # some samples stop, some run to max_new_tokens
    assert summary["samples_per_s"] > 0 and len(kept) >= 2

    # Group the scored sequences by the prompt they start with: the candidates of each prompt.
    rendered = [tuple(chat.render_prompt(_messages(p), tokenizer).tolist()) for p in PROMPTS]
    by_prompt = {i: [(s, r) for s, r in seen if s[:len(ids)] == ids] for i, ids in enumerate(rendered)}
    assert sum(map(len, by_prompt.values())) == len(seen)
    assert any(len({s for s, _ in c}) > 1 for c in by_prompt.values())  # the K samples of a prompt differ
    for record in kept:
        i = int(record["where"].rsplit(":", 1)[1]) - 1
        candidates = by_prompt[i]
        assert record["k"] == K and record["candidates"] == len(candidates)
        best = max(r for _, r in candidates)
        assert record["reward"] == pytest.approx(float(best))
        sequence = chat.render_pair(_messages(record), record["response"], record["response"], tokenizer,
                                    max_len=49).chosen
        assert any(s == tuple(sequence.tolist()) and r == pytest.approx(best) for s, r in candidates)
        assert record["metadata"] == {k: v for k, v in PROMPTS[i].items() if k not in ("prompt", "system")}
        assert ("gold_score" in record) == ("task" in PROMPTS[i])
    assert summary["reward_kept"] == pytest.approx(np.mean([r["reward"] for r in kept]))
    assert summary["reward_kept"] >= summary["reward_random"]

    # The file is SFT data as it stands: prompt (and system) then the kept answer.
    examples = list(iter_sft_examples(str(out)))
    assert [e.messages[-1].content for e in examples] == [r["response"] for r in kept]
    assert all(e.messages[-1].role == "assistant" for e in examples)
    if any("gold_score" in r for r in kept):
        for key in ("gold_score", "gold_score_kept", "gold_score_random", "gold_score_oracle"):
            assert 0.0 <= summary[key] <= 1.0
        assert summary["gold_score_oracle"] >= summary["gold_score_kept"]


def test_the_seed_reproduces_the_file_and_the_threshold_drops(runs, prompts_file, tmp_path, capsys):
    policy, rm = runs
    args = ["rejection-sample", "--run", policy, "--reward-run", rm, "--prompts", prompts_file, "--k", str(K),
            "--max-new-tokens", str(SAMPLING.max_new_tokens), "--batch-size", "8"]
    assert cli.main([*args, "--out", str(tmp_path / "a.jsonl"), "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a = _read(tmp_path / "a.jsonl")
    assert summary["kept"] == len(a) >= 2 and summary["sampling"]["temperature"] == 1.0

    again = rejection_sample(policy, rm, prompts_file, str(tmp_path / "b.jsonl"), K, SAMPLING, batch_size=8,
                             seed=3, progress=False)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert again["reward_mean"] == pytest.approx(summary["reward_mean"])

    other = rejection_sample(policy, rm, prompts_file, str(tmp_path / "c.jsonl"), K, SAMPLING, batch_size=8,
                             seed=4, progress=False)
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()
    assert other["samples"] == summary["samples"]

    # The same samples with a threshold between the kept rewards: only the answers at or above it stay.
    threshold = float(np.median([r["reward"] for r in a]))
    cut = rejection_sample(policy, rm, prompts_file, str(tmp_path / "d.jsonl"), K, SAMPLING, batch_size=8,
                           seed=3, threshold=threshold, progress=False)
    d = _read(tmp_path / "d.jsonl")
    assert d == [r for r in a if r["reward"] >= threshold] and 0 < len(d) < len(a)
    assert cut["dropped_by_threshold"] == len(a) - len(d) and cut["threshold"] == threshold
    assert all(r["reward"] >= threshold for r in d)


def _copy_run(run_dir, dest, config_edit=None, tokenizer_edit=None):
    shutil.copytree(run_dir, dest)
    if config_edit:
        path = os.path.join(dest, "config.json")
        config = json.load(open(path))
        config_edit(config)
        json.dump(config, open(path, "w"))
    if tokenizer_edit:
        path = os.path.join(dest, "tokenizer.model")
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(open(path, "rb").read())
        tokenizer_edit(proto)
        open(path, "wb").write(proto.SerializeToString())
    return str(dest)


def test_errors_name_the_runs_and_the_values(runs, prompts_file, tmp_path, capsys):
    policy, rm = runs
    out = str(tmp_path / "out.jsonl")

    def fails(*args):
        code = cli.main(["rejection-sample", "--prompts", prompts_file, "--out", out, *args])
        assert code != 0
        return capsys.readouterr().err

    assert "k (samples per prompt) must be ≥ 1, got 0" in fails("--run", policy, "--reward-run", rm, "--k", "0")
    assert "threshold must be a finite reward, got nan" in fails("--run", policy, "--reward-run", rm,
                                                                 "--threshold", "nan")
    with pytest.raises(ValueError, match="threshold must be a finite reward, got inf"):
        rejection_sample(policy, rm, prompts_file, out, K, SAMPLING, threshold=float("inf"))

    err = fails("--run", str(tmp_path / "nowhere"), "--reward-run", rm)
    assert "policy run directory" in err and "nowhere" in err and "does not exist" in err
    with pytest.raises(JudgeError, match="judge .*nowhere.*: no such reward run directory"):
        rejection_sample(policy, str(tmp_path / "nowhere"), prompts_file, out, K, SAMPLING)

    err = fails("--run", policy, "--reward-run", policy)
    assert f"judge {policy!r} is a 'sft' run, not a reward model (config.objective 'reward')" in err

    def swap_two_pieces(proto):
        proto.pieces[300].piece, proto.pieces[301].piece = proto.pieces[301].piece, proto.pieces[300].piece
    retokenized = _copy_run(rm, tmp_path / "rm_other_tokenizer", tokenizer_edit=swap_two_pieces)
    err = fails("--run", policy, "--reward-run", retokenized)
    assert f"policy run {policy!r} and reward run {retokenized!r} use different tokenizers" in err

    def other_template(config):
        config["data"]["chat_template"] = "other"
    templated = _copy_run(rm, tmp_path / "rm_other_template", config_edit=other_template)
    err = fails("--run", policy, "--reward-run", templated)
    assert "uses chat template 'chatml_min' but reward run" in err and "'other'" in err
    assert not os.path.exists(out)  # nothing written by a failed command
