"""`llm-jax pipeline --config configs/rounds.py`: the rounds' stage list and links, options that fail before any
stage runs, and two rounds at the `small` size run once: each round starts from the last one's model (params
lineage), rejection sampling keeps the judge's argmax of the K samples (checked by hand on a few prompts), a
rerun skips every stage, and the summary lists each round's gold scores.

The base chain (pretrain, sft, pairs, reward) is tests/test_pipeline.py's. Here the rounds start from
conftest's `tiny_rl_runs`, copied into the workdir as finished `sft` and `reward` stages: a policy whose K
samples differ and mostly stop and a reward model that ranks them, so that the rounds have answers to keep and
pairs to write at this size (a few-step SFT model answers nothing the gold scorer can tell apart)."""
import json
import os
import shutil

import numpy as np
import pytest

from llm_jax import cli, config_lib
from llm_jax.pipeline import STAGE_FILE, PipelineError, run_pipeline, train_overrides
from llm_jax.train.metrics import read_metrics

BASE = ("pretrain", "sft", "pairs", "reward")
ROUNDS = (("rs1", "sft1", "pairs1", "dpo1"), ("rs2", "sft2", "pairs2", "dpo2"))
ROUND_STAGES = ROUNDS[0] + ROUNDS[1]
SMALL = "configs/rounds.py:size=small,pairs_judge=reward"
# sft<r> holds its embedding still, so that its embedding is exactly the one of the model it started from;
# rs2 is judged by gold, rs1 by the reward model: both judges' selections are checked.
RUN_ARGS = ["--config.stages.sft1.extra=optim.freeze=embedding", "--config.stages.sft2.extra=optim.freeze=embedding",
            "--config.stages.rs2.judge=gold"]


def test_stage_list_links_and_base_chain():
    config = config_lib.load("configs/rounds.py:tiny", [])
    assert tuple(config.order) == BASE + ROUND_STAGES + ("arena",)
    assert set(config.stages.arena.competitors) == {"base", "sft", "sft1", "dpo1", "sft2", "dpo2"}
    assert [tuple(r) for r in config.rounds] == [("sft",), *ROUNDS]
    base = config_lib.load("configs/pipeline.py:tiny", [])
    assert all(config.stages[n].to_dict() == base.stages[n].to_dict() for n in BASE)

    stages = config.stages
    assert (stages.rs1.run, stages.rs2.run) == ("{workdir}/sft", "{workdir}/dpo1")
    assert (stages.rs1.judge, stages.rs1.reward_run, stages.rs1.kind) == ("reward", "{workdir}/reward", "rejection")
    assert {"train.init_from=W/sft", "data.train=W/rs1/sft.jsonl"} <= set(train_overrides(config, "sft1", "W"))
    assert {"train.init_from=W/dpo1", "data.train=W/rs2/sft.jsonl"} <= set(train_overrides(config, "sft2", "W"))
    assert (stages.pairs2.run, stages.pairs2.judge, stages.pairs2.pairs) == ("{workdir}/sft2", "gold", "best-worst")
    assert {"train.init_from=W/sft2", "data.train=W/pairs2/pairs.jsonl"} <= set(train_overrides(config, "dpo2", "W"))
    assert stages.sft2.evaluate and stages.dpo2.evaluate
    # seeds differ from the base pairs stage's, which sampled the same SFT model as rs1
    assert [stages[n].seed_offset for n in ("pairs", "rs1", "pairs1", "rs2")] == [0, 1, 1, 2]

    three = config_lib.load("configs/rounds.py:size=tiny,rounds=3,pairs_judge=reward", [])
    assert three.order[-5:] == ("rs3", "sft3", "pairs3", "dpo3", "arena") and three.stages.rs3.run == "{workdir}/dpo2"
    assert (three.stages.pairs3.judge, three.stages.pairs3.min_margin) == ("reward", 0.0)


@pytest.mark.parametrize("arg, message", [
    ("rounds=0", "rounds must be ≥ 1, got 0"),
    ("pairs_judge=human", r"pairs_judge must be one of \['reward', 'gold'\], got 'human'"),
    ("size=huge", r"unknown rounds size 'huge'; known: \['tiny', 'small'\]"),
])
def test_bad_arguments_are_named(arg, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(f"configs/rounds.py:{arg}", [])


@pytest.mark.parametrize("override, message", [
    ("stages.rs1.judge=human", r"stage 'rs1' has judge 'human'; known: \['gold', 'reward'\]"),
    ("stages.pairs2.reward_run=", "stage 'pairs2' has judge 'reward' but no reward_run"),
    ("stages.rs2.k=0", r"stage 'rs2' .*k \(samples per prompt\) must be ≥ 1, got 0"),
    ("stages.rs1.threshold=high", "stage 'rs1' has threshold 'high'; expected a number or None"),
    ("stages.rs1.threshold=nan", "threshold must be a finite reward, got nan"),
])
def test_bad_sampling_options_fail_before_any_stage_runs(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message):
        run_pipeline(config_lib.load(SMALL, [override]), str(tmp_path))
    assert os.listdir(tmp_path) == []


def _completed(workdir, name, run=None):
    """<workdir>/<name> as a finished stage: a copy of `run` (else empty) and a stage.json without results."""
    directory = os.path.join(workdir, name)
    if run:
        shutil.copytree(run, directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STAGE_FILE), "w") as f:
        json.dump(dict(stage=name, kind="train", seconds=0.0, metrics={}), f)


@pytest.fixture(scope="module")
def rounds_dir(tmp_path_factory, tiny_rl_runs):
    workdir = str(tmp_path_factory.mktemp("rounds"))
    policy, rm = tiny_rl_runs
    # the policy stands in for the pretrained model too: the arena's base answers with it in plain text
    for name, run in (("pretrain", policy), ("sft", policy), ("pairs", None), ("reward", rm)):
        _completed(workdir, name, run)
    assert cli.main(["pipeline", "--config", SMALL, "--workdir", workdir, *RUN_ARGS]) == 0
    return workdir


def _stage(workdir, name):
    with open(os.path.join(workdir, name, STAGE_FILE)) as f:
        return json.load(f)


def _params(run_dir):
    import jax
    from llm_jax.runs import load_run
    return jax.tree.map(np.asarray, load_run(run_dir).params)["params"]


@pytest.mark.slow
def test_each_round_starts_from_the_last_rounds_model(rounds_dir):
    path = lambda name: os.path.join(rounds_dir, name)  # noqa: E731
    summary = json.load(open(path("summary.json")))
    assert summary["ran"] == [*ROUND_STAGES, "arena"]
    for r, start in ((1, "sft"), (2, "dpo1")):
        assert _stage(rounds_dir, f"rs{r}")["summary"]["policy_run"] == path(start)
        assert _stage(rounds_dir, f"pairs{r}")["summary"]["policy_run"] == path(f"sft{r}")
        assert json.load(open(path(f"sft{r}/config.json")))["train"]["init_from"] == path(start)
        assert json.load(open(path(f"dpo{r}/config.json")))["train"]["init_from"] == path(f"sft{r}")
        # DPO's first step is taken at its reference, sft<r>: log π − log π_ref is 0 there
        first = next(m for m in read_metrics(path(f"dpo{r}")) if "kl_to_reference" in m)
        assert first["step"] == 1 and abs(first["kl_to_reference"]) < 1e-3, first

    # The params themselves: sft<r> held its embedding still, so it holds the embedding of the model it started
    # from, bit for bit; DPO trains the embedding, so only dpo1 holds sft2's.
    embedding = {n: _params(path(n))["embedding"] for n in ("sft", "sft1", "dpo1", "sft2", "dpo2")}
    np.testing.assert_array_equal(embedding["sft1"], embedding["sft"])
    np.testing.assert_array_equal(embedding["sft2"], embedding["dpo1"])
    assert not np.array_equal(embedding["dpo1"], embedding["sft1"])
    assert not np.array_equal(embedding["dpo2"], embedding["sft2"])


def _resampled(rounds_dir, name, judge):
    """The K samples of rejection stage `name` drawn again (same prompts, model, seed, batching) as candidates."""
    from llm_jax.generate import SamplingConfig
    from llm_jax.rl.sampling import sample_and_judge
    stage = _stage(rounds_dir, name)
    settings = stage["summary"]["sampling"]
    sampling = SamplingConfig(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"])
    sampled = sample_and_judge("test", stage["summary"]["policy_run"], judge, stage["summary"]["prompts"],
                               stage["summary"]["k"], sampling, batch_size=settings["batch_size"],
                               seed=settings["seed"], step=None, mesh=None, rules=None, progress=False)
    with open(os.path.join(rounds_dir, name, "sft.jsonl")) as f:
        kept = {record["where"]: record for record in map(json.loads, f)}
    return sampled.prompts, kept


@pytest.mark.slow
def test_rejection_keeps_the_judges_best_of_k(rounds_dir, tiny_rl_runs):
    from llm_jax.data.default_task import gold_score
    from llm_jax.objectives.reward import load_scorer
    from llm_jax.eval.judges import GoldJudge, RewardModelJudge
    reward_run = os.path.join(rounds_dir, "reward")
    scorer = load_scorer(reward_run)

    # rs1, the reward model's pick: every candidate scored afresh through the scorer's own text interface
    prompts, kept = _resampled(rounds_dir, "rs1", RewardModelJudge(reward_run))
    with_candidates = [p for p in prompts if p.candidates]
    assert len(kept) == len(with_candidates) == _stage(rounds_dir, "rs1")["metrics"]["kept"] > 8
    for p in with_candidates[:4]:
        texts = [c.record["response"] for c in p.candidates]
        scores = np.asarray(scorer.score([p.candidates[0].record["prompt"]] * len(texts), texts))
        record = kept[p.candidates[0].row["where"]]
        assert record["response"] == texts[int(np.argmax(scores))]
        assert record["reward"] == pytest.approx(scores.max(), abs=1e-3) and record["candidates"] == len(texts)

    # rs2, gold's pick: gold_score of each candidate text, the first best on ties
    prompts, kept = _resampled(rounds_dir, "rs2", GoldJudge())
    assert _stage(rounds_dir, "rs2")["summary"]["judge"] == "gold"
    for p in [p for p in prompts if p.candidates][:6]:
        prompt = p.candidates[0].record["prompt"]
        gold = [gold_score(prompt, c.record["response"]) for c in p.candidates]
        record = kept[p.candidates[0].row["where"]]
        assert record["response"] == p.candidates[int(np.argmax(gold))].record["response"]
        assert record["reward"] == record["gold_score"] == max(gold)


@pytest.mark.slow
def test_the_summary_lists_each_rounds_gold(rounds_dir):
    summary = json.load(open(os.path.join(rounds_dir, "summary.json")))
    rounds = summary["rounds"]
    assert [r["stages"] for r in rounds] == [["sft"], *map(list, ROUNDS)]
    for r, names in zip(rounds[1:], ROUNDS):
        rs, sft, _, dpo = names
        assert list(r["gold"]) == [sft, dpo]
        for name in (sft, dpo):
            metrics = summary["stages"][name]["metrics"]
            assert r["gold"][name] == dict(greedy=metrics["gold_greedy"], sampled=metrics["gold_sampled"])
            assert 0.0 <= r["gold"][name]["greedy"] <= 1.0
        assert r["rejection"][rs]["kept"] == summary["stages"][rs]["metrics"]["kept"] > 0

    table = summary["table"]
    assert table == open(os.path.join(rounds_dir, "summary.md")).read()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["stage", *BASE, *ROUND_STAGES, "arena", "total", "round", "0", "1", "2"]
    # the last stage rates every round's models against each other, the base model and round 0's SFT model
    assert set(summary["arena"]["ratings"]) == {"base", "sft", "sft1", "dpo1", "sft2", "dpo2"}
    for r, (rs, sft, _, dpo) in enumerate(ROUNDS, 1):
        line = next(line for line in table.splitlines() if line.startswith(f"| {r} |"))
        gold = {n: f"{n} {g['greedy']:.3f} ({g['sampled']:.3f})" for n, g in rounds[r]["gold"].items()}
        assert f"{gold[sft]} → {gold[dpo]}" in line
        assert f"{rs} {rounds[r]['rejection'][rs]['kept']:,} of 32" in line
    assert "kept" in table and "(judge " in table and "(the gold judge)" in table


@pytest.mark.slow
def test_rerun_skips_every_complete_stage(rounds_dir, capsys):
    stamps = lambda: {n: os.path.getmtime(os.path.join(rounds_dir, n, STAGE_FILE))  # noqa: E731
                      for n in BASE + ROUND_STAGES + ("arena",)}
    before = stamps()
    capsys.readouterr()
    assert cli.main(["pipeline", "--config", SMALL, "--workdir", rounds_dir, *RUN_ARGS]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| stage | seconds | result |") and err.count("skipped") == len(BASE + ROUND_STAGES) + 1
    assert json.load(open(os.path.join(rounds_dir, "summary.json")))["ran"] == []
    assert stamps() == before
