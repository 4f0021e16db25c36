"""Objectives by name. Each module exports `build_data(config, tokenizer, workdir)`,
`make_train_step(config, model, optimizer, schedule)` and `make_eval_step(config, model)`; the shared loop
calls them and never branches on which objective it runs."""
import importlib

OBJECTIVES = {"lm": "llm_jax.objectives.lm"}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective={name!r} is not one of {sorted(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])
