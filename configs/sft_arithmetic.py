r"""SFT of the tiny pretrained model on the embedded arithmetic task (llm_jax/data/arithmetic_task.py).

    llm-jax train --config configs/sft_arithmetic.py --workdir runs/arith_steps       # from runs/pipeline/pretrain
    llm-jax train --config configs/sft_arithmetic.py:variant=direct --workdir runs/arith_direct
    llm-jax train --config configs/sft_arithmetic.py:init_from=runs/pre,steps=1500 --workdir runs/arith

Arguments: `variant` (`steps`: demonstrations that write the columns with their carries before the answer;
`direct`: the answer alone), `steps`, `seed`, `init_from` (the tiny pretraining run; by default the README
pipeline's). The model and tokenizer are configs/pretrain.py:tiny's; a step is 16 rows of 128 tokens (about three
steps demonstrations a row). Every eval also answers 128 held-out prompts greedily and logs their `numeric_match`
accuracy as eval_arithmetic_score.

The 1,200 steps take 4.5 to 5 minutes on the shared 2-core CPU and stop partway through learning: greedy accuracy
on the 512 held-out prompts 0.62 with the steps (0.49 sampled at temperature 1, and 68% of the prompts get both a
right and a wrong answer among 8 samples: a signal for group-relative RL), 0.006 with the answers alone. The
accuracy rises steeply around here and the point differs from run to run (0.21 after a 900-step schedule, 0.80
after 1,000, 0.88 after 1,500): experiments/arithmetic/README.md.
"""
from llm_jax.config_lib import ConfigError, parse_arg
from llm_jax.configs_common import stage_config

VARIANTS = ("steps", "direct")
_STAGE = {"tiny": dict(data=dict(seq_len=128, batch_size=16),
                       optim=dict(lr=3e-3, warmup_steps=20, min_lr_ratio=0.1),
                       train=dict(steps=1200, log_every=10, eval_every=400, checkpoint_every=400, eval_batches=8))}


def get_config(arg=None):
    arg = parse_arg(arg, variant="steps", steps=-1, seed=0, init_from="runs/pipeline/pretrain")
    if arg.variant not in VARIANTS:
        raise ConfigError(f"unknown arithmetic variant {arg.variant!r}; known: {list(VARIANTS)}")
    config = stage_config(f"size=tiny,seed={arg.seed}", objective="sft", init_from=arg.init_from, stage_sizes=_STAGE)
    if arg.steps > 0:
        config.train.steps = arg.steps
    config.data.train = "arithmetic_task" if arg.variant == "steps" else f"arithmetic_task:{arg.variant}"
    config.train.generative_evals.arithmetic = dict(prompts="arithmetic_task", judge="numeric_match",
                                                    n_prompts=128, max_new_tokens=48, batch_size=64)
    return config
