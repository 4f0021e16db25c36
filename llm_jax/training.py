"""`llm-jax train`: the objective a config names, run on its loop.

    run(config, workdir, generative_evals=None) -> summary dict

An objective that is a pass over a fixed dataset (lm, sft, reward, dpo) runs on train/loop.py; one that makes
its own data (RL samples it) names its loop (`LOOP` in its module, objectives/__init__.py `own_loop`). Both loops
run on the same harness (train/harness.py). This module sits above objectives/ and train/, so neither imports
the other to find a loop.
"""
from __future__ import annotations

from llm_jax.config_lib import ConfigError
from llm_jax.objectives import get_objective, own_loop
from llm_jax.train import loop as train_loop


def run(config, workdir: str, generative_evals=None) -> dict:
    """Trains (or resumes) `config`'s run in `workdir`. `generative_evals`: eval/during_training.py
    `training_evals(config)`, for the loops that take them."""
    objective = get_objective(config.objective)
    loop = own_loop(objective)
    if loop is None:
        return train_loop.run(config, workdir, objective, generative_evals)
    if generative_evals:
        raise ConfigError(f"train.generative_evals: the {config.objective} loop runs its own evaluation")
    return loop(config, workdir)
