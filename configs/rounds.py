r"""Llama 3's post-training loop for N rounds on the embedded task: rejection sampling → SFT → DPO, each round
starting from the best model so far (llm_jax/pipeline.py runs it).

    llm-jax pipeline --config configs/rounds.py:tiny --workdir runs/rounds
    llm-jax pipeline --config configs/rounds.py:size=tiny,rounds=3,pairs_judge=reward --workdir runs/rounds_rm
    llm-jax pipeline --config configs/rounds.py:size=tiny,select=False --workdir runs/rounds_last   # no selection
    llm-jax pipeline --config 'configs/rounds.py:size=tiny,average=True,capabilities=reasoning:data/r.jsonl:0.2' \
        --workdir runs/rounds_avg

Stages, in order, each in `<workdir>/<name>/`. First the base chain of configs/pipeline.py, built by its own
builders (pretrain, sft, pairs, reward: the SFT model the rounds start from and the reward model that judges),
then for r = 1..N, with M the model round r starts from (`sft` for round 1; else the model select<r-1> chose,
`select<r-1>/model`, or with `select=False` the last round's `dpo<r-1>`):

    rs<r>     rejection sampling: K samples of M per train prompt, each prompt's best by the `rs_judge` kept
              as SFT records (`rs<r>/sft.jsonl`); Llama 3 (Dubey et al. 2024, §4.2.2) picks with its reward model
    sft<r>    configs/sft.py from M on rs<r>'s records (eval loss on the task's held-out SFT records); then the
              gold-scored greedy and sampled answers to the held-out prompts
    pairs<r>  on-policy preference pairs: K samples of sft<r> per train prompt, the `pairs_judge`'s best against
              its worst answer
    dpo<r>    configs/dpo.py from sft<r> (its reference) on pairs<r>'s pairs (held-out pair accuracy on the
              task's synthetic eval pairs); then the same evals as sft<r>
    avg<r>    with `average=True`: a run whose params are the mean of sft<r>'s and dpo<r>'s (llm_jax/average.py;
              a model soup of the round; Llama 3 averages the models of its runs, §4.1), then the same evals
    select<r> (`select=True`, the default) an arena of the best model so far (the incumbent: `sft` in round 1,
              then the model select<r-1> chose) and the round's candidates sft<r>, dpo<r> (and avg<r>), answering
              the first `select_prompts` held-out prompts (all 512 at `tiny`) sampled at `select_temperature`
              (1.0; 0 answers greedily), judged by `select_judge` (`gold`, default, or `reward`, the reward
              model); the highest Bradley–Terry rating goes on, linked at `select<r>/model`
              (relative: `../dpo1`), which the next round starts from. A candidate must beat the incumbent's rating
              (by more than the stage's `margin`, 0 Elo points by default): on a tie the incumbent stays, and of
              tied candidates the higher mean score, then the first of sft, dpo, avg, goes on
              (llm_jax/eval/arena.py choose_winner). A rerun keeps the link with the stage.

Selection keeps a round from losing what the last one gained: a round's DPO can give back score (at `tiny`,
round 2's DPO lowered greedy gold 0.998 → 0.992, experiments/post_training/README.md), and the next round would
otherwise start from it. `select=False` is the plain loop, each round starting from the last dpo<r>; the rounds'
other stages are the same either way, so the two compare directly (experiments/post_training/rounds_selection.py).

Capabilities. Each round's SFT data can mix named sets of demonstrations of one's own with the kept answers, so
that a skill the rejection-sampled answers do not teach (reasoning, tool use) is trained every round, as Llama 3
mixes capability-specific data into its SFT rounds (Dubey et al. 2024, §4.3):

    capabilities=name:spec:weight;name:spec:weight      e.g. reasoning:data/reasoning.jsonl:0.2;arith:arithmetic_task:0.1

Each spec is one SFT record file, a glob or an embedded task (`arithmetic_task:direct`), each weight the share of
the SFT rows it takes (> 0); the kept answers take the rest (`rs_weight`, default 1 − their sum; set it and all
weights are normalised). sft<r>'s data is then `data.mixture` (llm_jax/data/mixture.py): `rs`, the kept answers
(evaluated on the task's held-out demonstrations), and each capability (held out by hash at data.eval_fraction,
an embedded task by its own eval split), each rendered and packed on its own, mixed in exactly those shares, each
with an eval loss of its own (`eval_<name>_loss`). A bad entry (a weight ≤ 0, a missing file, a name given twice or
`rs`) fails before any stage runs. One round's weights: `--config.stages.sft2.extra=data.mixture.arith.weight=0.3`.
Capabilities are an argument rather than a config field because the stages are planned when the config is built:
the argument is what every round's data is made from.

The summary's rounds table lists the gold scores of every round's sft<r>, dpo<r> (and avg<r>) beside round 0's sft,
and each round's selection: every model's rating and mean score and the one that went on (`rounds[i]["selection"]`
in summary.json). The last stage, `arena`, rates all of them against each other and the base model
(configs/pipeline.py's arena).

Judges. Rejection sampling is judged by the reward model, as in Llama 3: that is the automatic step of the loop.
The preference pairs are judged by gold by default (`pairs_judge=gold`): Llama 3 has human annotators rank
samples of its latest models each round, and on this task the gold scorer, the program that defines it,
stands in for them, as it does for the base pipeline's pairs. `pairs_judge=reward` labels the pairs with the
reward model instead: the fully automatic loop, with no labels after the reward stage, at the price of
training DPO on the reward model's mistakes (at data version 1 it agreed with gold on the SFT model's samples
0.88 of the time, experiments/post_training/README.md). `rs_judge=gold` picks with the oracle: the ceiling of
rejection sampling. Measured at `tiny` at data version 1 (clean demonstrations;
experiments/post_training/README.md): the reward model's picks score 0.71 against gold's 0.91, below the SFT
model's own greedy answers (0.87), so each round's SFT lowers the greedy score and its DPO on gold pairs
raises it again, while the sampled score rises every round; with gold picking one round lifts greedy to 0.91.
With the reward judge, pairs keep every strict preference (min_margin 0: its scores are logits on a scale of
its own); with gold, the base pipeline's 0.2.

Pairs are best-against-worst (one per prompt), not every two answers as for the reward model: DPO then sees
each prompt once per epoch, as in iterative DPO (Dong et al. 2024), rather than its correlated pairs as
independent rows. Every sampling stage of round r draws with seed + r, so rs1 does not redraw the very samples
that the base pairs stage drew from the same SFT model and the reward model was trained on.

Reusing a base chain: every stage with a stage.json is skipped, so the base stages of an earlier
configs/pipeline.py run can be copied or linked into the workdir (`ln -s ../pipeline/sft runs/rounds/sft`,
the same for pretrain, pairs and reward) and only the rounds run.

Arguments: `size` (`tiny`; `small`: two-layer models, a few steps each, the test suite's; its numbers mean
nothing), `rounds` (N ≥ 1, default 2: about 8 minutes a round at `tiny` on a shared 2-core CPU), `seed`,
`rs_judge` and `pairs_judge` (`reward` | `gold`), `select` (True), `select_judge` (`gold` | `reward`),
`select_prompts` (0: 512 at `tiny`, 8 at `small`), `select_temperature` (1.0), `average` (False), `capabilities` ("") and `rs_weight` (0).
"""
import importlib.util
import math
import os
import re

from llm_jax.config_lib import ConfigError, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
BASE_STAGES = ("pretrain", "sft", "pairs", "reward")
JUDGES = ("reward", "gold")
GOLD_MIN_MARGIN, REWARD_MIN_MARGIN = 0.2, 0.0  # llm_jax/rl/preference_pairs.py's defaults for each judge

# From a model that already answers well: a short second SFT (about 2 epochs of ~4,000 kept answers packed
# 2–3 to a row) at a third of the first SFT's peak rate.
_ROUND_SFT = ("train.steps=100", "optim.lr=1e-3", "optim.warmup_steps=10", "train.eval_every=50",
              "train.checkpoint_every=50")
_SMALL_STEPS = ("train.steps=4", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4")
# 32 prompts × 4 samples: enough kept answers and pairs to fill a few small batches
_SMALL_SAMPLING = dict(n_prompts=32, k=4, max_new_tokens=8, batch_size=64)
_SMALL_SELECT = dict(n_prompts=8, max_new_tokens=8, bootstrap=50)
SELECT_PROMPTS = 512  # held-out prompts of each select stage's arena at `tiny`: all of them
# Selection compares sampled answers: on this task every model's greedy answers are near the ceiling (gold 0.96–0.97
# for sft, sft<r> and dpo<r> alike), so a greedy arena is decided by a few prompts and keeps the incumbent, while
# sampling separates the models (sft 0.73 against sft1 0.95: experiments/post_training/README.md).
SELECT_TEMPERATURE = 1.0
RS_COMPONENT = "rs"   # the rejection-sampled answers' name in a round's SFT mixture
_CAPABILITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a data.mixture component's name
_TASKS = ("default_task", "arithmetic_task")  # embedded tasks, rendered on first use (data/post_training.py)


def _pipeline_module():
    """configs/pipeline.py as a module (config files are loaded by path, not imported as a package)."""
    spec = importlib.util.spec_from_file_location("llm_jax_config_pipeline_for_rounds",
                                                  os.path.join(_HERE, "pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rejection_stage(run: str, judge: str, **changes) -> dict:
    """Rejection sampling from `run`: K samples per train prompt (the first n_prompts; 0: all 4,096), the best
    by `judge` (`reward`: the reward model of `reward_run`; `gold`) kept, at least `threshold` unless None."""
    stage = dict(kind="rejection", run=run, judge=judge, reward_run="{workdir}/reward", prompts="default_task",
                 n_prompts=0, k=8, threshold=None, temperature=1.0, max_new_tokens=16, batch_size=32,
                 seed_offset=0)
    return {**stage, **changes}


def select_stage(incumbent: str, candidates: tuple[str, ...], judge: str, **changes) -> dict:
    """The arena of the model of stage `incumbent` (the best so far) and the stages `candidates` on the first
    n held-out prompts, sampled at `temperature` (0: greedily), judged by `judge` (`gold` | `reward`: the reward model of `reward_run`);
    the winner (llm_jax/eval/arena.py choose_winner: a candidate must beat the incumbent by more than `margin` Elo
    points) is linked at `<stage>/model`."""
    stage = dict(kind="select", incumbent=incumbent, candidates=tuple(candidates), judge=judge,
                 reward_run="{workdir}/reward", prompts="default_task", n_prompts=SELECT_PROMPTS, max_new_tokens=16,
                 temperature=SELECT_TEMPERATURE, batch_size=64, seed_offset=0, bootstrap=200, plots=False,
                 margin=0.0)
    return {**stage, **changes}


def average_stage(*stages: str) -> dict:
    """A run whose params are the mean of the stages' (llm_jax/average.py), then the gold-scored evals."""
    return dict(kind="average", runs=tuple(f"{{workdir}}/{s}" for s in stages), evaluate=True)


def _spec_problem(spec: str) -> str | None:
    """Why a capability's data spec names no data (a path that is not a file, a glob that matches none), or None;
    an embedded task (`default_task`, `arithmetic_task[:variant]`) is rendered on first use."""
    from llm_jax.data.sources import DataError, resolve_files
    if spec.partition(":")[0] in _TASKS:
        return None
    try:
        resolve_files(spec)
    except DataError as e:
        return str(e)
    return None


def parse_capabilities(text: str, rs_weight: float) -> dict:
    """`name:spec:weight` entries separated by `;` as {name: dict(train=spec, weight=w)}, and the rejection-sampled
    answers' weight (rs_weight, or 1 − the capabilities' sum when 0), all checked: ConfigError naming the entry."""
    capabilities = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, rest = entry.partition(":")
        spec, _, weight_text = rest.rpartition(":")
        if not name or not spec:
            raise ConfigError(f"capability {entry!r} must be name:spec:weight (e.g. reasoning:data/reasoning.jsonl:0.2)")
        if not _CAPABILITY_NAME.match(name):
            raise ConfigError(f"capability name {name!r} must be a letter then letters, digits or _")
        if name == RS_COMPONENT or name in capabilities:
            taken = "the rejection-sampled answers" if name == RS_COMPONENT else "another capability"
            raise ConfigError(f"capability name {name!r} is taken by {taken}")
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"capability {name!r}: weight must be a number > 0, got {weight_text!r}")
        problem = _spec_problem(spec)
        if problem:
            raise ConfigError(f"capability {name!r}: {problem}")
        capabilities[name] = dict(train=spec, weight=weight)
    if rs_weight < 0 or not math.isfinite(rs_weight):
        raise ConfigError(f"rs_weight must be a number > 0 (0: 1 − the capabilities' weights), got {rs_weight}")
    if not rs_weight:
        rs_weight = 1.0 - sum(c["weight"] for c in capabilities.values())
        if rs_weight <= 1e-9:
            raise ConfigError(f"capability weights sum to {1.0 - rs_weight:g}, leaving the rejection-sampled answers "
                              "no share: lower them below 1 in total, or set rs_weight")
    return dict(capabilities=capabilities, rs_weight=rs_weight)


def sft_data(rs: str, capabilities: dict) -> tuple[str, ...]:
    """A round's SFT data overrides: the rejection stage `rs`'s kept answers (held out: the task's held-out
    demonstrations), mixed with the capability sets when there are any (data/mixture.py, each its own eval)."""
    answers = f"{{workdir}}/{rs}/sft.jsonl"
    if not capabilities["capabilities"]:
        return f"data.train={answers}", "data.eval=default_task"
    mixture = {RS_COMPONENT: dict(train=answers, weight=capabilities["rs_weight"], eval="default_task"),
               **capabilities["capabilities"]}
    return "data.train=", "data.eval=", f"data.mixture={mixture!r}"


def _check_arg(arg, sizes) -> None:
    if arg.size not in sizes:
        raise ConfigError(f"unknown rounds size {arg.size!r}; known: {list(sizes)}")
    if arg.rounds < 1:
        raise ConfigError(f"rounds must be ≥ 1, got {arg.rounds}")
    if not arg.select_temperature >= 0:
        raise ConfigError(f"select_temperature must be ≥ 0 (0: greedy), got {arg.select_temperature}")
    if arg.select_prompts < 0:
        raise ConfigError(f"select_prompts must be ≥ 1 (0: the size's default), got {arg.select_prompts}")
    for name in ("rs_judge", "pairs_judge", "select_judge"):
        if arg[name] not in JUDGES:
            raise ConfigError(f"{name} must be one of {list(JUDGES)}, got {arg[name]!r}")


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", rounds=2, seed=0, rs_judge="reward", pairs_judge="gold", select=True,
                    select_judge="gold", select_prompts=0, select_temperature=SELECT_TEMPERATURE, average=False,
                    capabilities="", rs_weight=0.0)
    pipeline = _pipeline_module()
    _check_arg(arg, pipeline.SIZES)
    capabilities = parse_capabilities(arg.capabilities, arg.rs_weight)
    c = pipeline.get_config(f"size={arg.size},seed={arg.seed}")
    for name in set(c.stages) - set(BASE_STAGES):
        del c.stages[name]
    small = arg.size == "small"
    sampling = _SMALL_SAMPLING if small else {}
    sft_extra = pipeline.SMALL["stages"]["sft"] + _SMALL_STEPS if small else _ROUND_SFT
    dpo_extra = pipeline.SMALL["stages"]["dpo"] + _SMALL_STEPS if small else ()
    margin = GOLD_MIN_MARGIN if arg.pairs_judge == "gold" else REWARD_MIN_MARGIN
    select = dict(_SMALL_SELECT, temperature=float(arg.select_temperature)) if small else dict(
        temperature=float(arg.select_temperature))
    if arg.select_prompts:
        select["n_prompts"] = arg.select_prompts

    order, rounds, start, best = list(BASE_STAGES), [("sft",)], "sft", "sft"
    for r in range(1, arg.rounds + 1):
        names = (f"rs{r}", f"sft{r}", f"pairs{r}", f"dpo{r}")
        rs, sft, pairs, dpo = names
        c.stages[rs] = rejection_stage(f"{{workdir}}/{start}", arg.rs_judge, seed_offset=r, **sampling)
        c.stages[sft] = pipeline.train_stage(
            "sft.py:tiny", f"train.init_from={{workdir}}/{start}", *sft_data(rs, capabilities), *sft_extra,
            evaluate=True)
        c.stages[pairs] = pipeline.pairs_stage(
            f"{{workdir}}/{sft}", judge=arg.pairs_judge, reward_run="{workdir}/reward", pairs="best-worst",
            min_margin=margin, seed_offset=r, **sampling)
        c.stages[dpo] = pipeline.train_stage(
            "dpo.py:tiny", f"train.init_from={{workdir}}/{sft}", f"data.train={{workdir}}/{pairs}/pairs.jsonl",
            "data.eval=default_task", *dpo_extra, evaluate=True)
        candidates = (sft, dpo)
        if arg.average:
            c.stages[f"avg{r}"] = average_stage(sft, dpo)
            names += (f"avg{r}",)
            candidates += (f"avg{r}",)
        start = dpo
        if arg.select:
            c.stages[f"select{r}"] = select_stage(best, candidates, arg.select_judge, **select)
            names += (f"select{r}",)
            best = f"select{r}"
            start = f"select{r}/model"  # the winner, linked there by the select stage (llm_jax/pipeline.py)
        order += names
        rounds.append(names)
    # The arena of every round's models with the base model and the SFT model the rounds start from.
    models = ("sft", *(name for names in rounds[1:] for name in names if name.startswith(("sft", "dpo", "avg"))))
    c.stages.arena = pipeline.arena_stage("pretrain", models)
    if small:
        arena = dict(pipeline.SMALL["arena"])
        c.stages.arena.competitors.base.few_shot = arena.pop("base_few_shot")
        c.stages.arena.update(arena)
    c.order = (*order, "arena")
    c.rounds = tuple(rounds)
    return c
