"""`llm-jax pipeline --config configs/rounds.py`: the rounds' stage list and links (with and without best-model
selection, with averaging, with capability data), options that fail before any stage runs, and two rounds at the
`small` size run once, with selection by the reward model, averaging and a capability set: each round starts
from the model its select stage chose (params lineage, through the stage's relative link), that model is the
best rated of the incumbent and the round's candidates, the averaged model is the mean of the round's SFT and DPO
models, each round's SFT mixes the kept answers with the capability set in its share, rejection sampling keeps
the judge's argmax of the K samples (checked by hand on a few prompts), a rerun skips every stage and keeps the
links (also in a moved copy), and the summary lists each round's gold scores and selection.

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
from llm_jax.data import default_task, mixture
from llm_jax.eval.arena import choose_winner
from llm_jax.pipeline import STAGE_FILE, PipelineError, run_pipeline, train_overrides
from llm_jax.train.metrics import read_metrics

BASE = ("pretrain", "sft", "pairs", "reward")
PLAIN_ROUNDS = (("rs1", "sft1", "pairs1", "dpo1"), ("rs2", "sft2", "pairs2", "dpo2"))
ROUNDS = tuple(names + (f"select{r}",) for r, names in enumerate(PLAIN_ROUNDS, 1))  # selection is on by default
ROUND_STAGES = ROUNDS[0] + ROUNDS[1]
SMALL = "configs/rounds.py:size=small,pairs_judge=reward"
# The run below: the reward model picks each round's model, the round's SFT and DPO models are averaged (a third
# candidate), and a capability set of a quarter of each round's SFT data.
RUN_ROUNDS = tuple(names[:4] + (f"avg{r}", f"select{r}") for r, names in enumerate(ROUNDS, 1))
RUN_STAGES = RUN_ROUNDS[0] + RUN_ROUNDS[1]
CAPABILITY_SHARE = 0.25
# sft<r> holds its embedding still, so that its embedding is exactly the one of the model it started from;
# rs2 is judged by gold, rs1 by the reward model: both judges' selections are checked. The select stages compare
# sampled answers (the default; greedily every model of this size answers every prompt alike, an empty answer: a
# tie); and dpo1 takes larger steps, so that the reward model rates it above the incumbent and round 2 starts from it.
RUN_ARGS = ["--config.stages.sft1.extra=optim.freeze=embedding", "--config.stages.sft2.extra=optim.freeze=embedding",
            "--config.stages.rs2.judge=gold", "--config.stages.dpo1.extra=optim.lr=0.01"]


def test_stage_list_links_and_base_chain():
    config = config_lib.load("configs/rounds.py:tiny", [])
    assert tuple(config.order) == BASE + ROUND_STAGES + ("arena",)
    assert set(config.stages.arena.competitors) == {"base", "sft", "sft1", "dpo1", "sft2", "dpo2"}
    assert [tuple(r) for r in config.rounds] == [("sft",), *ROUNDS]
    base = config_lib.load("configs/pipeline.py:tiny", [])
    assert all(config.stages[n].to_dict() == base.stages[n].to_dict() for n in BASE)

    stages = config.stages
    # round 1 starts from round 0's SFT model, round 2 from the model select1 chose (its link)
    assert (stages.rs1.run, stages.rs2.run) == ("{workdir}/sft", "{workdir}/select1/model")
    assert (stages.rs1.judge, stages.rs1.reward_run, stages.rs1.kind) == ("reward", "{workdir}/reward", "rejection")
    assert {"train.init_from=W/sft", "data.train=W/rs1/sft.jsonl"} <= set(train_overrides(config, "sft1", "W"))
    assert {"train.init_from=W/select1/model", "data.train=W/rs2/sft.jsonl"} <= set(train_overrides(config, "sft2",
                                                                                                     "W"))
    select1, select2 = stages.select1, stages.select2
    assert (select1.kind, select1.incumbent, tuple(select1.candidates)) == ("select", "sft", ("sft1", "dpo1"))
    assert (select2.incumbent, tuple(select2.candidates)) == ("select1", ("sft2", "dpo2"))
    assert (select1.judge, select1.n_prompts, select1.temperature, select1.margin) == ("gold", 512, 1.0, 0.0)
    assert (stages.pairs2.run, stages.pairs2.judge, stages.pairs2.pairs) == ("{workdir}/sft2", "gold", "best-worst")
    assert {"train.init_from=W/sft2", "data.train=W/pairs2/pairs.jsonl"} <= set(train_overrides(config, "dpo2", "W"))
    assert stages.sft2.evaluate and stages.dpo2.evaluate
    # seeds differ from the base pairs stage's, which sampled the same SFT model as rs1
    assert [stages[n].seed_offset for n in ("pairs", "rs1", "pairs1", "rs2")] == [0, 1, 1, 2]

    three = config_lib.load("configs/rounds.py:size=tiny,rounds=3,pairs_judge=reward", [])
    assert three.order[-6:] == ("rs3", "sft3", "pairs3", "dpo3", "select3", "arena")
    assert three.stages.rs3.run == "{workdir}/select2/model"
    assert (three.stages.pairs3.judge, three.stages.pairs3.min_margin) == ("reward", 0.0)


def test_without_selection_each_round_starts_from_the_last_dpo():
    config = config_lib.load("configs/rounds.py:size=tiny,select=False", [])
    assert tuple(config.order) == BASE + PLAIN_ROUNDS[0] + PLAIN_ROUNDS[1] + ("arena",)
    assert [tuple(r) for r in config.rounds] == [("sft",), *PLAIN_ROUNDS]
    assert config.stages.rs2.run == "{workdir}/dpo1"
    assert "train.init_from=W/dpo1" in train_overrides(config, "sft2", "W")
    # the rounds themselves are the same stages with selection on: only where round 2 starts differs
    selecting = config_lib.load("configs/rounds.py:tiny", [])
    assert all(config.stages[n].to_dict() == selecting.stages[n].to_dict() for n in PLAIN_ROUNDS[0] + ("pairs2",))


def test_averaging_adds_a_candidate_to_each_selection_and_the_arena():
    config = config_lib.load("configs/rounds.py:size=tiny,average=True,select_judge=reward,select_prompts=64", [])
    assert [tuple(r) for r in config.rounds] == [("sft",), *RUN_ROUNDS]
    assert tuple(config.stages.avg2.runs) == ("{workdir}/sft2", "{workdir}/dpo2") and config.stages.avg2.evaluate
    assert (config.stages.avg2.kind, tuple(config.stages.select2.candidates)) == ("average", ("sft2", "dpo2", "avg2"))
    assert (config.stages.select2.judge, config.stages.select2.n_prompts) == ("reward", 64)
    assert {"avg1", "avg2"} <= set(config.stages.arena.competitors)
    # averaged but not selected: every round still starts from the last DPO model
    plain = config_lib.load("configs/rounds.py:size=tiny,average=True,select=False", [])
    assert "select1" not in plain.order and plain.stages.rs2.run == "{workdir}/dpo1" and "avg1" in plain.order


def _mixture_of(config, stage, workdir="W"):
    """{component: (train spec, share)} of a train stage's data as it will run."""
    loaded = config_lib.load(config.stages[stage].config, train_overrides(config, stage, workdir))
    return {c.name: (c.train, pytest.approx(c.weight)) for c in mixture.components(loaded.data)}


def test_capabilities_join_every_rounds_sft_data(tmp_path):
    reasoning = tmp_path / "reasoning.jsonl"
    reasoning.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    arg = f"size=tiny,capabilities=reasoning:{reasoning}:0.2;arith:arithmetic_task:direct:0.1"
    config = config_lib.load(f"configs/rounds.py:{arg}", [])
    for r in (1, 2):
        assert _mixture_of(config, f"sft{r}") == {"rs": (f"W/rs{r}/sft.jsonl", 0.7), "reasoning": (str(reasoning), 0.2),
                                                  "arith": ("arithmetic_task:direct", 0.1)}
    # rs_weight sets the kept answers' weight (then all are normalised); a round's extra overrides one weight
    config = config_lib.load(f"configs/rounds.py:{arg},rs_weight=1.7",
                             ["stages.sft2.extra=data.mixture.arith.weight=0.3"])
    assert _mixture_of(config, "sft1")["rs"] == ("W/rs1/sft.jsonl", 0.85)
    assert _mixture_of(config, "sft2")["arith"] == ("arithmetic_task:direct", 0.3 / (1.7 + 0.2 + 0.3))
    # the rounds' other stages and the sizes without capabilities are unchanged
    assert config_lib.load("configs/rounds.py:tiny", []).stages.sft1.overrides[1:3] == (
        "data.train={workdir}/rs1/sft.jsonl", "data.eval=default_task")


@pytest.mark.parametrize("arg, message", [
    ("rounds=0", "rounds must be ≥ 1, got 0"),
    ("pairs_judge=human", r"pairs_judge must be one of \['reward', 'gold'\], got 'human'"),
    ("select_judge=human", r"select_judge must be one of \['reward', 'gold'\], got 'human'"),
    ("size=huge", r"unknown rounds size 'huge'; known: \['tiny', 'small'\]"),
    ("capabilities=reasoning:default_task:0", r"capability 'reasoning': weight must be a number > 0, got '0'"),
    ("capabilities=reasoning:default_task:-0.2", r"capability 'reasoning': weight must be .* got '-0.2'"),
    ("capabilities=reasoning:default_task", r"capability 'reasoning:default_task' must be name:spec:weight"),
    ("capabilities=reasoning:/no/such/file.jsonl:0.2", r"capability 'reasoning': /no/such/file.jsonl: no such file"),
    ("capabilities=reasoning:/no/such/*.jsonl:0.2", r"capability 'reasoning': glob '/no/such/\*.jsonl' matches no"),
    ("capabilities=rs:default_task:0.2", r"capability name 'rs' is taken by the rejection-sampled answers"),
    ("capabilities=a:default_task:0.2;a:arithmetic_task:0.1", r"capability name 'a' is taken by another capability"),
    ("capabilities=2a:default_task:0.2", r"capability name '2a' must be a letter then letters, digits or _"),
    ("capabilities=a:default_task:0.6;b:arithmetic_task:0.4", r"capability weights sum to 1, leaving the "
                                                               r"rejection-sampled answers no share"),
    ("capabilities=a:default_task:0.2,rs_weight=-1.0", r"rs_weight must be a number > 0"),
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
    ("stages.select1.margin=-5.0", r"stage 'select1' has margin -5.0; expected a number of Elo points >= 0"),
    ("stages.select2.judge=human", r"stage 'select2' has judge 'human'"),
    ("stages.select1.candidates=('sft1','dpo2')", r"stage 'select1' has candidate 'dpo2', which is not a stage before"),
    ("stages.select2.incumbent=select3", r"stage 'select2' has incumbent 'select3', which is not a stage before it"),
])
def test_bad_sampling_options_fail_before_any_stage_runs(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message):
        run_pipeline(config_lib.load(SMALL, [override]), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_the_rounds_table_has_a_selection_column_only_with_selection():
    from llm_jax.pipeline_table import format_rounds
    gold = {"sft1": dict(greedy=0.9, sampled=0.6), "dpo1": dict(greedy=0.95, sampled=0.7)}
    rejection = {"rs1": dict(kept=30, count=32, gold_score_kept=0.8, gold_score=0.5)}
    plain = [dict(round=0, gold={}, rejection={}), dict(round=1, gold=gold, rejection=rejection)]
    lines = format_rounds(plain)
    assert "selection" not in lines[1] and lines[-1] == (
        "| 1 | rs1 30 of 32; 0.800 / 0.500 | sft1 0.900 (0.600) → dpo1 0.950 (0.700) |")
    selection = dict(stage="select1", incumbent="sft", winner="dpo1", judge="gold", n_prompts=8, margin=0.0,
                     models={"sft": dict(rating=990.4, mean_score=0.5), "sft1": dict(rating=995.0, mean_score=0.55),
                             "dpo1": dict(rating=1014.6, mean_score=0.6)})
    lines = format_rounds([dict(plain[0], selection=None), dict(plain[1], selection=selection)])
    assert lines[1].endswith("| selection: Elo (mean score) → the model that goes on |") and lines[-2].endswith("|  |")
    assert lines[-1].endswith("| dpo1 1015 (0.600); sft1 995 (0.550); sft (incumbent) 990 (0.500) → **dpo1** |")


def _completed(workdir, name, run=None):
    """<workdir>/<name> as a finished stage: a copy of `run` (else empty) and a stage.json without results."""
    directory = os.path.join(workdir, name)
    if run:
        shutil.copytree(run, directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STAGE_FILE), "w") as f:
        json.dump(dict(stage=name, kind="train", seconds=0.0, metrics={}), f)


def _run_command(workdir):
    """The run's command line: the small rounds, selection by the reward model (its scores tell the small
    models' answers apart, gold's would mostly tie), averaging, and the capability file beside the workdir."""
    capability = os.path.join(os.path.dirname(workdir), "demos.jsonl")
    spec = f"{SMALL},select_judge=reward,average=True,capabilities=demos:{capability}:{CAPABILITY_SHARE}"
    return ["pipeline", "--config", spec, "--workdir", workdir, *RUN_ARGS]


@pytest.fixture(scope="module")
def rounds_dir(tmp_path_factory, tiny_rl_runs):
    workdir = os.path.join(str(tmp_path_factory.mktemp("rounds")), "run")
    policy, rm = tiny_rl_runs
    # the policy stands in for the pretrained model too: the arena's base answers with it in plain text
    for name, run in (("pretrain", policy), ("sft", policy), ("pairs", None), ("reward", rm)):
        _completed(workdir, name, run)
    # a capability of one's own: 500 of the task's demonstrations (about 10 held out by hash, data.eval_fraction)
    with open(default_task.write_default_task()["sft_train"]) as f, \
            open(os.path.join(os.path.dirname(workdir), "demos.jsonl"), "w") as out:
        out.writelines(line for _, line in zip(range(500), f))
    assert cli.main(_run_command(workdir)) == 0
    return workdir


def _stage(workdir, name):
    with open(os.path.join(workdir, name, STAGE_FILE)) as f:
        return json.load(f)


def _params(run_dir):
    import jax
    from llm_jax.runs import load_run
    return jax.tree.map(np.asarray, load_run(run_dir).params)["params"]


@pytest.mark.slow
def test_each_round_starts_from_the_model_its_selection_chose(rounds_dir):
    path = lambda name: os.path.join(rounds_dir, name)  # noqa: E731
    summary = json.load(open(path("summary.json")))
    assert summary["ran"] == [*RUN_STAGES, "arena"]
    winner = _stage(rounds_dir, "select1")["summary"]["winner"]
    assert winner != "sft", "the run is set up for a candidate to win select1 (RUN_ARGS); it did not"
    assert os.readlink(path("select1/model")) == os.path.join("..", winner)  # relative: the workdir may move
    assert os.path.realpath(path("select1/model")) == os.path.realpath(path(winner))
    for r, start in ((1, "sft"), (2, "select1/model")):
        assert _stage(rounds_dir, f"rs{r}")["summary"]["policy_run"] == path(start)
        assert _stage(rounds_dir, f"pairs{r}")["summary"]["policy_run"] == path(f"sft{r}")
        assert json.load(open(path(f"sft{r}/config.json")))["train"]["init_from"] == path(start)
        assert json.load(open(path(f"dpo{r}/config.json")))["train"]["init_from"] == path(f"sft{r}")
        # DPO's first step is taken at its reference, sft<r>: log π − log π_ref is 0 there
        first = next(m for m in read_metrics(path(f"dpo{r}")) if "kl_to_reference" in m)
        assert first["step"] == 1 and abs(first["kl_to_reference"]) < 1e-3, first

    # The params themselves: sft<r> held its embedding still, so it holds the embedding of the model it started
    # from, bit for bit: round 0's for sft1, the one select1 chose for sft2; DPO trains the embedding.
    embedding = {n: _params(path(n))["embedding"] for n in ("sft", "sft1", "dpo1", "avg1", "sft2", "dpo2")}
    np.testing.assert_array_equal(embedding["sft1"], embedding["sft"])
    np.testing.assert_array_equal(embedding["sft2"], embedding[winner])
    assert not np.array_equal(embedding["dpo1"], embedding["sft1"])
    assert not np.array_equal(embedding["dpo2"], embedding["sft2"])


@pytest.mark.slow
def test_each_selection_is_the_best_rated_of_the_incumbent_and_the_rounds_candidates(rounds_dir):
    incumbent = "sft"
    for r in (1, 2):
        record = _stage(rounds_dir, f"select{r}")
        s = record["summary"]
        assert (s["incumbent"], s["candidates"]) == (incumbent, [f"sft{r}", f"dpo{r}", f"avg{r}"])
        assert [c["name"] for c in s["competitors"]] == [incumbent, f"sft{r}", f"dpo{r}", f"avg{r}"]
        assert s["judge"] == os.path.join(rounds_dir, "reward") and s["n_prompts"] == 8 and s["baseline"] == incumbent
        ratings = {n: v["value"] for n, v in s["ratings"].items()}
        means = {n: v["value"] for n, v in s["mean_scores"].items()}
        assert s["winner"] == choose_winner(ratings, means, incumbent)
        assert record["metrics"][f"rating_{s['winner']}"] == max(ratings.values()) or s["winner"] == incumbent
        assert os.path.isfile(os.path.join(rounds_dir, f"select{r}", "arena.json"))
        incumbent = s["winner"]  # the next round's incumbent is this round's winner, by its own name


@pytest.mark.slow
def test_the_averaged_model_is_the_mean_of_the_rounds_sft_and_dpo(rounds_dir):
    import jax
    for r in (1, 2):
        sft, dpo, avg = (_params(os.path.join(rounds_dir, f"{n}{r}")) for n in ("sft", "dpo", "avg"))
        jax.tree.map(lambda a, b, m: np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6, atol=1e-7), sft, dpo, avg)
        metrics = _stage(rounds_dir, f"avg{r}")["metrics"]
        assert 0.0 <= metrics["gold_greedy"] <= 1.0 and "gold_sampled" in metrics
    assert {"avg1", "avg2"} <= set(json.load(open(os.path.join(rounds_dir, "summary.json")))["arena"]["ratings"])


@pytest.mark.slow
def test_each_rounds_sft_mixes_the_kept_answers_with_the_capability_set(rounds_dir):
    for r in (1, 2):
        metrics = read_metrics(os.path.join(rounds_dir, f"sft{r}"))
        assert (metrics[0]["rs_share"], metrics[0]["demos_share"]) == (1 - CAPABILITY_SHARE, CAPABILITY_SHARE)
        assert metrics[0]["rs_n_train_examples"] == _stage(rounds_dir, f"rs{r}")["metrics"]["kept"]
        assert metrics[0]["demos_n_eval_examples"] > 0
        last = [m for m in metrics if "eval_loss" in m][-1]
        assert last["eval_loss"] == pytest.approx((1 - CAPABILITY_SHARE) * last["eval_rs_loss"]
                                                  + CAPABILITY_SHARE * last["eval_demos_loss"])


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
def test_the_summary_lists_each_rounds_gold_and_selection(rounds_dir):
    summary = json.load(open(os.path.join(rounds_dir, "summary.json")))
    rounds = summary["rounds"]
    assert [r["stages"] for r in rounds] == [["sft"], *map(list, RUN_ROUNDS)]
    assert rounds[0]["selection"] is None
    for r, names in zip(rounds[1:], RUN_ROUNDS):
        rs, sft, _, dpo, avg, select = names
        assert list(r["gold"]) == [sft, dpo, avg]
        for name in (sft, dpo, avg):
            metrics = summary["stages"][name]["metrics"]
            assert r["gold"][name] == dict(greedy=metrics["gold_greedy"], sampled=metrics["gold_sampled"])
            assert 0.0 <= r["gold"][name]["greedy"] <= 1.0
        assert r["rejection"][rs]["kept"] == summary["stages"][rs]["metrics"]["kept"] > 0
        chosen = _stage(rounds_dir, select)["summary"]
        assert r["selection"]["winner"] == chosen["winner"] and r["selection"]["stage"] == select
        assert r["selection"]["models"] == {n: dict(rating=chosen["ratings"][n]["value"],
                                                    mean_score=chosen["mean_scores"][n]["value"])
                                            for n in chosen["ratings"]}

    table = summary["table"]
    assert table == open(os.path.join(rounds_dir, "summary.md")).read()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["stage", *BASE, *RUN_STAGES, "arena", "total", "round", "0", "1", "2"]
    # the last stage rates every round's models against each other, the base model and round 0's SFT model
    assert set(summary["arena"]["ratings"]) == {"base", "sft", "sft1", "dpo1", "avg1", "sft2", "dpo2", "avg2"}
    assert "selection: Elo (mean score) → the model that goes on" in table
    for r, (rs, sft, _, dpo, avg, _) in enumerate(RUN_ROUNDS, 1):
        line = next(line for line in table.splitlines() if line.startswith(f"| {r} |"))
        gold = {n: f"{n} {g['greedy']:.3f} ({g['sampled']:.3f})" for n, g in rounds[r]["gold"].items()}
        assert f"{gold[sft]} → {gold[dpo]} → {gold[avg]}" in line
        assert f"{rs} {rounds[r]['rejection'][rs]['kept']:,} of 32" in line
        assert line.endswith(f"→ **{rounds[r]['selection']['winner']}** |")
        assert f"{rounds[r]['selection']['incumbent']} (incumbent)" in line
    assert "kept" in table and "(judge " in table and "(the gold judge)" in table and "goes on" in table


@pytest.mark.slow
def test_rerun_skips_every_complete_stage_and_keeps_the_links(rounds_dir, capsys, tmp_path):
    names = BASE + RUN_STAGES + ("arena",)
    stamps = lambda d: {n: os.path.getmtime(os.path.join(d, n, STAGE_FILE)) for n in names}  # noqa: E731
    links = lambda d: {r: os.readlink(os.path.join(d, f"select{r}", "model")) for r in (1, 2)}  # noqa: E731
    before, linked = stamps(rounds_dir), links(rounds_dir)
    capsys.readouterr()
    assert cli.main(_run_command(rounds_dir)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| stage | seconds | result |") and err.count("skipped") == len(names)
    assert json.load(open(os.path.join(rounds_dir, "summary.json")))["ran"] == []
    assert stamps(rounds_dir) == before and links(rounds_dir) == linked

    # a moved copy of the workdir: every link is relative, so each resolves inside the copy, and nothing reruns
    moved = str(tmp_path / "moved")
    shutil.copytree(rounds_dir, moved, symlinks=True)
    shutil.copy(os.path.join(os.path.dirname(rounds_dir), "demos.jsonl"), tmp_path)
    for r in (1, 2):
        winner = _stage(moved, f"select{r}")["summary"]["winner"]
        assert os.path.realpath(os.path.join(moved, f"select{r}", "model")) == os.path.realpath(
            os.path.join(moved, winner))
    assert cli.main(_run_command(moved)) == 0
    assert json.load(open(os.path.join(moved, "summary.json")))["ran"] == []
