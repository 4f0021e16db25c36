r"""The whole assistant pipeline on the embedded default data, one stage after another (llm_jax/pipeline.py).

    llm-jax pipeline --config configs/pipeline.py:tiny --workdir runs/pipeline
    llm-jax pipeline --config configs/pipeline.py:tiny --workdir runs/p2 --config.seed=1 \
        --config.stages.ppo.extra="ppo.kl_coef=0.1 train.steps=60" --config.stages.pairs.k=4

Stages, in `order`, each in `<workdir>/<name>/`:

    pretrain  configs/pretrain.py (trains its own tokenizer on the default corpus)
    sft       configs/sft.py from pretrain; then greedy and sampled answers to the held-out prompts, gold-scored
    pairs     on-policy preference pairs: K samples per train prompt from sft, judged by the gold scorer
              (the program that defines the task stands in for InstructGPT's labellers)
    reward    configs/reward.py from sft, on the task's synthetic pairs and the on-policy ones; pair accuracy
              on the synthetic held-out pairs
    ppo       configs/ppo.py: policy sft, reward model reward
    dpo       configs/dpo.py from sft; then the same evaluation as sft

A train stage is a config spec plus `overrides` (field=value strings; `{workdir}` becomes the pipeline's
workdir, so stages name the runs they start from) and `extra`, more overrides separated by spaces, empty
here so that a researcher can add some from the command line without restating the links. `seed` is passed to
every train stage and seeds the pairs' sampling. `evaluate` adds the gold-scored generations of `eval`.

Sizes: `tiny` (the README's run) and `small` (every stage shrunk to a two-layer model and a few steps: the
test suite's whole chain in a few minutes; its numbers mean nothing).
"""
import os

import ml_collections

from llm_jax.config_lib import ConfigError, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("pretrain", "sft", "pairs", "reward", "ppo", "dpo")

# The conftest's small model, with short runs: every code path runs, and the post-training stages take two evals
# so a test can see their metrics move the right way.
_SMALL_MODEL = ("model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
                "model.d_ff=128", "model.vocab_size=512", "tokenizer.vocab_size=512")
_SMALL_RUN = ("data.batch_size=8", "optim.warmup_steps=2", "train.steps=24", "train.log_every=6",
              "train.eval_every=12", "train.checkpoint_every=24", "train.eval_batches=2")
_SMALL = {
    "stages": {
        "pretrain": _SMALL_MODEL + _SMALL_RUN + ("data.seq_len=64", "train.steps=6", "train.eval_every=6",
                                                 "train.checkpoint_every=6"),
        "sft": _SMALL_MODEL + _SMALL_RUN,
        "reward": _SMALL_MODEL + _SMALL_RUN,
        "dpo": _SMALL_MODEL + _SMALL_RUN + ("optim.lr=2e-3", "dpo.nll_coef=0.0"),
        "ppo": _SMALL_MODEL + ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                               "ppo.rollout_batch=8", "ppo.minibatch=8", "ppo.epochs=1", "ppo.n_eval_prompts=8",
                               "ppo.max_new_tokens=6"),
    },
    "pairs": dict(n_prompts=8, k=4, max_new_tokens=8),
    "eval": dict(n_prompts=16, max_new_tokens=8),
}
SIZES = ("tiny", "small")


def _train(spec: str, *overrides: str, evaluate: bool = False) -> dict:
    return dict(kind="train", config=os.path.join(_HERE, spec), overrides=tuple(overrides), extra="",
                evaluate=evaluate)


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", seed=0)
    if arg.size not in SIZES:
        raise ConfigError(f"unknown pipeline size {arg.size!r}; known: {list(SIZES)}")
    c = ml_collections.ConfigDict()
    c.seed = arg.seed
    c.order = ORDER
    c.stages = ml_collections.ConfigDict(dict(
        pretrain=_train("pretrain.py:tiny"),
        sft=_train("sft.py:tiny", "train.init_from={workdir}/pretrain", evaluate=True),
        pairs=dict(kind="pairs", run="{workdir}/sft", judge="gold", prompts="default_task",
                   n_prompts=0,          # the first n prompts of the file; 0: all (the task's 4,096 train prompts)
                   k=8, pairs="all", min_margin=0.2, temperature=1.0, max_new_tokens=16, batch_size=32),
        reward=_train("reward.py:tiny", "train.init_from={workdir}/sft",
                      "data.train=default_task,{workdir}/pairs/pairs.jsonl",
                      "data.eval=default_task"),  # held-out prompts' synthetic pairs: none of the train prompts
        ppo=_train("ppo.py:tiny", "train.init_from={workdir}/sft", "ppo.reward_run={workdir}/reward"),
        dpo=_train("dpo.py:tiny", "train.init_from={workdir}/sft", evaluate=True),
    ))
    # Gold-scored answers to held-out prompts after the stages that set `evaluate`: greedy, and sampled at
    # `temperature` with `seed`, which is what PPO's own evals report (eval_gold_greedy, eval_gold).
    c.eval = ml_collections.ConfigDict(dict(prompts="default_task", n_prompts=0, max_new_tokens=16,
                                            temperature=1.0, seed=0, batch_size=64))
    if arg.size == "small":
        for name, overrides in _SMALL["stages"].items():
            c.stages[name].overrides = c.stages[name].overrides + overrides
        c.stages.pairs.update(_SMALL["pairs"])
        c.eval.update(_SMALL["eval"])
    return c
