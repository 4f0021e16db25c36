r"""The whole assistant pipeline on the embedded default data, one stage after another (llm_jax/pipeline.py).

    llm-jax pipeline --config configs/pipeline.py:tiny --workdir runs/pipeline
    llm-jax pipeline --config configs/pipeline.py:tiny --workdir runs/p2 --config.seed=1 \
        --config.stages.ppo.extra="rl.kl_coef=0.1 train.steps=60" --config.stages.pairs.k=4

Stages, in `order`, each in `<workdir>/<name>/`:

    pretrain  configs/pretrain.py (trains its own tokenizer on the default corpus)
    sft       configs/sft.py from pretrain; then greedy and sampled answers to the held-out prompts, gold-scored
    pairs     on-policy preference pairs: K samples per train prompt from sft, judged by the gold scorer
              (the program that defines the task stands in for InstructGPT's labellers)
    reward    configs/reward.py from sft, on the task's synthetic pairs and the on-policy ones; pair accuracy
              on the synthetic held-out pairs
    ppo       configs/ppo.py: policy sft, reward model reward (GAE with a value model)
    grpo      configs/grpo.py: the same policy and reward model, 8 samples a prompt compared within their group
              (no value model; a KL term in the loss), the same number of responses per iteration as ppo
    dpo       configs/dpo.py from sft; then the same evaluation as sft
    arena     every stage's model answers the same held-out prompts greedily (the pretrained base model
              4-shot in plain text, it has no chat template; the others zero-shot in theirs), the gold judge
              scores them, and the table shows Bradley–Terry (Elo-scale) ratings with intervals and each one's
              win rate against sft (llm_jax/eval/compare.py; `<workdir>/arena/arena.md`, arena.png)

A train stage is a config spec plus `overrides` (field=value strings; `{workdir}` becomes the pipeline's
workdir, so stages name the runs they start from) and `extra`, more overrides separated by spaces, empty
here so that a researcher can add some from the command line without restating the links. `seed` is passed to
every train stage and seeds the pairs' sampling. `evaluate` adds the gold-scored generations of `eval`.

Sizes: `tiny` (the README's run) and `small` (every stage shrunk to a two-layer model and a few steps: the
test suite's whole chain in a few minutes; its numbers mean nothing).

`hf`: post-training of a Hugging Face checkpoint instead of pretraining. The first stage imports `base`
(`llm-jax import-hf`), SFT trains on `chats` (your jsonl conversations, rendered in the checkpoint's own chat
template; default: the embedded task), and pairs, reward, PPO, GRPO and DPO follow on the embedded task's prompts,
judged by its gold scorer, every stage with its `hf` preset (the model taken from the run it starts from):

    llm-jax pipeline --config configs/pipeline.py:hf --workdir runs/p --config.base=/models/Qwen2.5-0.5B-Instruct \
        --config.chats=my_chats.jsonl

`hf_small` is the same chain shrunk to a few steps (the test suite runs it on a tiny fixture checkpoint).

configs/rounds.py builds on this file's stages and builders (`train_stage`, `pairs_stage`, `eval_settings`, the
SMALL settings), so both pipelines run the same base chain.
"""
import os

import ml_collections

from llm_jax.config_lib import ConfigError, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("pretrain", "sft", "pairs", "reward", "ppo", "grpo", "dpo", "arena")
HF_ORDER = ("base", "sft", "pairs", "reward", "ppo", "grpo", "dpo", "arena")
BASE_FEW_SHOT = 4  # demonstrations before each prompt for the pretrained base model in the arena

# The conftest's small model, with short runs: every code path runs, and the post-training stages take two evals
# so a test can see their metrics move the right way.
SMALL_MODEL = ("model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
               "model.d_ff=128", "model.vocab_size=512", "tokenizer.vocab_size=512")
SMALL_RUN = ("data.batch_size=8", "optim.warmup_steps=2", "train.steps=24", "train.log_every=6",
             "train.eval_every=12", "train.checkpoint_every=24", "train.eval_batches=2")
SMALL = {
    "stages": {
        "pretrain": SMALL_MODEL + SMALL_RUN + ("data.seq_len=64", "train.steps=6", "train.eval_every=6",
                                               "train.checkpoint_every=6"),
        "sft": SMALL_MODEL + SMALL_RUN,
        "reward": SMALL_MODEL + SMALL_RUN,
        "dpo": SMALL_MODEL + SMALL_RUN + ("optim.lr=2e-3", "dpo.nll_coef=0.0"),
        "ppo": SMALL_MODEL + ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                              "rl.rollout_batch=8", "rl.minibatch=8", "rl.epochs=1", "rl.n_eval_prompts=8",
                              "rl.max_new_tokens=6"),
        "grpo": SMALL_MODEL + ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                               "rl.rollout_batch=8", "rl.samples_per_prompt=4", "rl.minibatch=8", "rl.epochs=1",
                               "rl.n_eval_prompts=8", "rl.max_new_tokens=6"),
    },
    "pairs": dict(n_prompts=8, k=4, max_new_tokens=8),
    "eval": dict(n_prompts=16, max_new_tokens=8),
    # the small base model's context (64 tokens) holds no demonstration besides the prompt
    "arena": dict(n_prompts=16, max_new_tokens=8, bootstrap=200, base_few_shot=0),
}
SIZES = ("tiny", "small")
HF_SIZES = ("hf", "hf_small")
HF_SMALL = {
    "stages": {
        "sft": ("data.seq_len=256", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4",
                "train.eval_batches=2", "optim.warmup_steps=1"),
        "reward": ("data.seq_len=256", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4",
                   "train.eval_batches=2", "optim.warmup_steps=1"),
        "dpo": ("data.seq_len=256", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4",
                "train.eval_batches=2", "optim.warmup_steps=1"),
        "ppo": ("data.seq_len=256", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                "rl.rollout_batch=8", "rl.minibatch=8", "rl.epochs=1", "rl.n_eval_prompts=8",
                "rl.max_new_tokens=6"),
        "grpo": ("data.seq_len=256", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                 "rl.rollout_batch=8", "rl.samples_per_prompt=4", "rl.minibatch=8", "rl.epochs=1",
                 "rl.n_eval_prompts=8", "rl.max_new_tokens=6"),
    },
    "pairs": dict(n_prompts=8, k=4, max_new_tokens=8),
    "eval": dict(n_prompts=8, max_new_tokens=8),
    "arena": dict(n_prompts=8, max_new_tokens=8, bootstrap=200, base_few_shot=1),  # a 256-token context
}


def train_stage(spec: str, *overrides: str, evaluate: bool = False) -> dict:
    """`llm-jax train` of `spec` (a file in configs/) with `overrides`; `evaluate`: then the gold-scored evals."""
    return dict(kind="train", config=os.path.join(_HERE, spec), overrides=tuple(overrides), extra="",
                evaluate=evaluate)


def pairs_stage(run: str, **changes) -> dict:
    """On-policy preference pairs from `run`, judged by `judge`: `gold`, or `reward` (the reward model of the run
    `reward_run`); the first n prompts of `prompts` (0: all, the task's 4,096 train prompts), sampled with the
    pipeline's seed + `seed_offset`; `changes` set fields."""
    stage = dict(kind="pairs", run=run, judge="gold", reward_run="", prompts="default_task", n_prompts=0,
                 k=8, pairs="all", min_margin=0.2, temperature=1.0, max_new_tokens=16, batch_size=32, seed_offset=0)
    unknown = sorted(set(changes) - set(stage))
    if unknown:
        raise ConfigError(f"pairs stage fields {unknown} do not exist; known: {sorted(stage)}")
    return {**stage, **changes}


def competitor(run: str, chat_template: bool = True, few_shot: int = 0) -> dict:
    """A model of the arena: its run, whether it answers in its chat template, its demonstrations (plain text
    without the template)."""
    return dict(run=run, chat_template=chat_template, few_shot=few_shot)


def arena_stage(base: str, models: tuple[str, ...], **changes) -> dict:
    """The arena of the stage `base` (answering `base_few_shot`-shot in plain text) and the stages `models` (in
    their chat template): the first n held-out prompts of `prompts`, answered greedily, judged by `judge` (`gold`
    or `reward`, the reward model of `reward_run`); win rates against `baseline`."""
    stage = dict(kind="arena", judge="gold", reward_run="", prompts="default_task", n_prompts=256, baseline="sft",
                 max_new_tokens=16, temperature=0.0, batch_size=64, seed_offset=0, bootstrap=1000, plots=True,
                 base_few_shot=BASE_FEW_SHOT)
    unknown = sorted(set(changes) - set(stage))
    if unknown:
        raise ConfigError(f"arena stage fields {unknown} do not exist; known: {sorted(stage)}")
    stage.update(changes)
    stage["competitors"] = dict(
        base=competitor(f"{{workdir}}/{base}", chat_template=False, few_shot=stage.pop("base_few_shot")),
        **{name: competitor(f"{{workdir}}/{name}") for name in models})
    return stage


def eval_settings(size: str) -> ml_collections.ConfigDict:
    """Gold-scored answers to held-out prompts after the stages that set `evaluate`: greedy, and sampled at
    `temperature` with `seed`, which is what PPO's own evals report (eval_gold_greedy, eval_gold)."""
    settings = ml_collections.ConfigDict(dict(prompts="default_task", n_prompts=0, max_new_tokens=16,
                                              temperature=1.0, seed=0, batch_size=64))
    if size == "small":
        settings.update(SMALL["eval"])
    elif size == "hf_small":
        settings.update(HF_SMALL["eval"])
    return settings


def post_training_stages(preset: str, start: str, *sft_overrides: str) -> dict:
    """SFT from the stage `start`, on-policy pairs, reward model, PPO, GRPO and DPO, every train stage with its
    `preset`."""
    return dict(
        sft=train_stage(f"sft.py:{preset}", f"train.init_from={{workdir}}/{start}", *sft_overrides, evaluate=True),
        pairs=pairs_stage("{workdir}/sft"),
        reward=train_stage(f"reward.py:{preset}", "train.init_from={workdir}/sft",
                           "data.train=default_task,{workdir}/pairs/pairs.jsonl",
                           "data.eval=default_task"),  # held-out prompts' synthetic pairs: none of the train prompts
        ppo=train_stage(f"ppo.py:{preset}", "train.init_from={workdir}/sft", "rl.reward_run={workdir}/reward"),
        grpo=train_stage(f"grpo.py:{preset}", "train.init_from={workdir}/sft", "rl.reward_run={workdir}/reward"),
        dpo=train_stage(f"dpo.py:{preset}", "train.init_from={workdir}/sft", evaluate=True),
        arena=arena_stage(start, ("sft", "ppo", "grpo", "dpo")),
    )


def shrink(c, small: dict) -> None:
    """Adds a shrunk size's overrides (SMALL, HF_SMALL) to its stages and pairs."""
    for name, overrides in small["stages"].items():
        c.stages[name].overrides = c.stages[name].overrides + overrides
    c.stages.pairs.update(small["pairs"])
    arena = dict(small["arena"])
    c.stages.arena.competitors.base.few_shot = arena.pop("base_few_shot")
    c.stages.arena.update(arena)


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seed=0)
    if arg.size not in SIZES + HF_SIZES:
        raise ConfigError(f"unknown pipeline size {arg.size!r}; known: {list(SIZES + HF_SIZES)}")
    if arg.size in HF_SIZES:
        return hf_config(arg)
    c = ml_collections.ConfigDict()
    c.seed = arg.seed
    c.order = ORDER
    c.stages = ml_collections.ConfigDict(dict(pretrain=train_stage("pretrain.py:tiny"),
                                              **post_training_stages("tiny", "pretrain")))
    c.eval = eval_settings(arg.size)
    if arg.size == "small":
        shrink(c, SMALL)
    return c


def hf_config(arg) -> ml_collections.ConfigDict:
    """The chain from a Hugging Face checkpoint (`base`) instead of pretraining; see the module docstring."""
    c = ml_collections.ConfigDict()
    c.seed = arg.seed
    c.base = ""                # the Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)
    c.chats = "default_task"   # SFT data: jsonl conversations, or the embedded task
    c.order = HF_ORDER
    c.stages = ml_collections.ConfigDict(dict(base=dict(kind="import", hf="{base}"),
                                              **post_training_stages("hf", "base", "data.train={chats}")))
    c.eval = eval_settings(arg.size)
    if arg.size == "hf_small":
        shrink(c, HF_SMALL)
    return c
