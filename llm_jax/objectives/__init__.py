"""Objectives by name; the shared loop calls them and never branches on which objective it runs.

Each module exports
- `build_data(config, tokenizer, workdir)`: the train stream and eval batches (`data/lm_data.LMData`);
- `make_train_step(config, model, optimizer, schedule)` and `make_eval_step(config, model)`;
- `finish_eval(metrics)`: eval means (sums over batches / weight, keys `eval_<stat>`) -> reported metrics;
and optionally
- `model_class`: the flax module the objective trains (default `Transformer`);
- `sequences_per_row`: forward sequences per batch row, for FLOP counting (2 for preference pairs);
- `params_from_run(run_dir, abstract_params)`: params to start from `train.init_from` (default: restore all).

An objective that is not a pass over a fixed dataset (PPO samples its own data) instead names its own loop:
`LOOP`, the module whose `run(config, workdir) -> summary` `train.loop.run` hands the run to (`own_loop`).
"""
import importlib

OBJECTIVES = {"lm": "llm_jax.objectives.lm", "sft": "llm_jax.objectives.sft",
              "reward": "llm_jax.objectives.reward", "dpo": "llm_jax.objectives.dpo",
              "ppo": "llm_jax.objectives.ppo"}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective={name!r} is not one of {sorted(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])


def own_loop(objective):
    """The `run(config, workdir)` of an objective that names its own loop (`LOOP`), else None."""
    name = getattr(objective, "LOOP", None)
    return importlib.import_module(name).run if name else None
