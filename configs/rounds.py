r"""Llama 3's post-training loop for N rounds on the embedded task: rejection sampling → SFT → DPO, each round
starting from the last one's model (llm_jax/pipeline.py runs it).

    llm-jax pipeline --config configs/rounds.py:tiny --workdir runs/rounds
    llm-jax pipeline --config configs/rounds.py:size=tiny,rounds=3,pairs_judge=reward --workdir runs/rounds_rm

Stages, in order, each in `<workdir>/<name>/`. First the base chain of configs/pipeline.py, built by its own
builders (pretrain, sft, pairs, reward: the SFT model the rounds start from and the reward model that judges),
then for r = 1..N, with M the model round r starts from (`sft` for round 1, else `dpo<r-1>`):

    rs<r>     rejection sampling: K samples of M per train prompt, each prompt's best by the `rs_judge` kept
              as SFT records (`rs<r>/sft.jsonl`); Llama 3 (Dubey et al. 2024, §4.2.2) picks with its reward model
    sft<r>    configs/sft.py from M on rs<r>'s records (eval loss on the task's held-out SFT records); then the
              gold-scored greedy and sampled answers to the held-out prompts
    pairs<r>  on-policy preference pairs: K samples of sft<r> per train prompt, the `pairs_judge`'s best against
              its worst answer
    dpo<r>    configs/dpo.py from sft<r> (its reference) on pairs<r>'s pairs (held-out pair accuracy on the
              task's synthetic eval pairs); then the same evals as sft<r>. The next round starts from it.

The summary's rounds table lists the gold scores of every round's sft<r> and dpo<r> beside round 0's sft, and the
last stage, `arena`, rates all of them against each other and the base model (configs/pipeline.py's arena).

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
`rs_judge` and `pairs_judge` (`reward` | `gold`).
"""
import importlib.util
import os

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


def _check_arg(arg, sizes) -> None:
    if arg.size not in sizes:
        raise ConfigError(f"unknown rounds size {arg.size!r}; known: {list(sizes)}")
    if arg.rounds < 1:
        raise ConfigError(f"rounds must be ≥ 1, got {arg.rounds}")
    for name in ("rs_judge", "pairs_judge"):
        if arg[name] not in JUDGES:
            raise ConfigError(f"{name} must be one of {list(JUDGES)}, got {arg[name]!r}")


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", rounds=2, seed=0, rs_judge="reward", pairs_judge="gold")
    pipeline = _pipeline_module()
    _check_arg(arg, pipeline.SIZES)
    c = pipeline.get_config(f"size={arg.size},seed={arg.seed}")
    for name in set(c.stages) - set(BASE_STAGES):
        del c.stages[name]
    small = arg.size == "small"
    sampling = _SMALL_SAMPLING if small else {}
    sft_extra = pipeline.SMALL["stages"]["sft"] + _SMALL_STEPS if small else _ROUND_SFT
    dpo_extra = pipeline.SMALL["stages"]["dpo"] + _SMALL_STEPS if small else ()
    margin = GOLD_MIN_MARGIN if arg.pairs_judge == "gold" else REWARD_MIN_MARGIN

    order, rounds, start = list(BASE_STAGES), [("sft",)], "sft"
    for r in range(1, arg.rounds + 1):
        names = (f"rs{r}", f"sft{r}", f"pairs{r}", f"dpo{r}")
        rs, sft, pairs, dpo = names
        c.stages[rs] = rejection_stage(f"{{workdir}}/{start}", arg.rs_judge, seed_offset=r, **sampling)
        c.stages[sft] = pipeline.train_stage(
            "sft.py:tiny", f"train.init_from={{workdir}}/{start}", f"data.train={{workdir}}/{rs}/sft.jsonl",
            "data.eval=default_task", *sft_extra, evaluate=True)
        c.stages[pairs] = pipeline.pairs_stage(
            f"{{workdir}}/{sft}", judge=arg.pairs_judge, reward_run="{workdir}/reward", pairs="best-worst",
            min_margin=margin, seed_offset=r, **sampling)
        c.stages[dpo] = pipeline.train_stage(
            "dpo.py:tiny", f"train.init_from={{workdir}}/{sft}", f"data.train={{workdir}}/{pairs}/pairs.jsonl",
            "data.eval=default_task", *dpo_extra, evaluate=True)
        order += names
        rounds.append(names)
        start = dpo
    # The arena of every round's models with the base model and the SFT model the rounds start from.
    models = ("sft", *(name for names in rounds[1:] for name in names if name.startswith(("sft", "dpo"))))
    c.stages.arena = pipeline.arena_stage("pretrain", models)
    if small:
        arena = dict(pipeline.SMALL["arena"])
        c.stages.arena.competitors.base.few_shot = arena.pop("base_few_shot")
        c.stages.arena.update(arena)
    c.order = (*order, "arena")
    c.rounds = tuple(rounds)
    return c
