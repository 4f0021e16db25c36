"""Objectives by name; the shared loop calls them and never branches on which objective it runs.

Each module exports
- `build_data(config, tokenizer, workdir)`: the train stream and eval batches (`data/lm_data.LMData`);
- `make_train_step(config, model, optimizer, schedule)` and `make_eval_step(config, model)`;
- `finish_eval(metrics)`: eval means (sums over batches / weight, keys `eval_<stat>`) -> reported metrics;
- `table_row(metrics, summary) -> str`: its stage's result in the pipeline's table (llm_jax/pipeline_table.py), from
  the stage's stage.json metrics and summary;
- `abstract_batch(config)`: one global train batch as shapes and dtypes, for `llm-jax memory`
  (llm_jax/train/memory.py);
and optionally
- `CONFIG_SECTION` and `CONFIG_DEFAULTS`: the name of its section of the config (`config.dpo`) and that section's
  fields with their defaults, which `configs_common.base_config` gathers (`config_sections`). Both are literals,
  each field's meaning in a comment beside it: they are read from the module's source without importing it, so
  loading a config file does not import JAX;
- `model_class`: the flax module the objective trains (default `Transformer`);
- `sequences_per_row`: forward sequences per batch row, for FLOP counting (2 for preference pairs), a number or
  a function of the config;
- `model_options(config) -> dict`: keyword fields of its model class beyond (cfg, mesh, rules), e.g. the reward
  model's `shared_prefix` for packed rows;
- `params_from_run(run_dir, abstract_params, model_cfg)`: params to start from `train.init_from` (default:
  `train.checkpoint.start_params`).

An objective that is not a pass over a fixed dataset (RL samples its own data) instead names its own loop:
`LOOP`, the module whose `run(config, workdir) -> summary` `llm_jax.training.run` hands the run to (`own_loop`).

Shared by the table rows (theirs and the pipeline's other stages'): `fmt`, `before_after`, `gold_text`.
"""
import ast
import functools
import importlib
import importlib.util

OBJECTIVES = {"lm": "llm_jax.objectives.lm", "sft": "llm_jax.objectives.sft",
              "reward": "llm_jax.objectives.reward", "dpo": "llm_jax.objectives.dpo",
              "rl": "llm_jax.objectives.rl"}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective={name!r} is not one of {sorted(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name])


def own_loop(objective):
    """The `run(config, workdir)` of an objective that names its own loop (`LOOP`), else None."""
    name = getattr(objective, "LOOP", None)
    return importlib.import_module(name).run if name else None


def _literal(module: str, name: str, node: ast.expr):
    try:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
            return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ValueError(f"{module}.{name} must be a literal (or dict(...) of literals), read without importing "
                         f"the module; got {ast.unparse(node)!r}") from e


@functools.cache
def _declared(module: str) -> tuple[str, dict] | None:
    """(CONFIG_SECTION, CONFIG_DEFAULTS) as written at the top level of `module`'s source, or None without them."""
    spec = importlib.util.find_spec(module)
    found = {}
    for node in ast.parse(spec.loader.get_source(module)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("CONFIG_SECTION", "CONFIG_DEFAULTS"):
                found[name] = _literal(module, name, node.value)
    if not found:
        return None
    if set(found) != {"CONFIG_SECTION", "CONFIG_DEFAULTS"}:
        raise ValueError(f"{module} declares {sorted(found)}: a config section needs both CONFIG_SECTION and "
                         "CONFIG_DEFAULTS")
    return found["CONFIG_SECTION"], found["CONFIG_DEFAULTS"]


def config_sections():
    """(section, defaults) of every objective that declares a config section, in registry order; each defaults
    dict a fresh copy. The objective modules are not imported (see `CONFIG_DEFAULTS` above)."""
    for module in OBJECTIVES.values():
        declared = _declared(module)
        if declared:
            yield declared[0], dict(declared[1])


def table_row_of(name: str):
    """The `table_row(metrics, summary)` of objective `name`, or None for a name that is not an objective."""
    return get_objective(name).table_row if name in OBJECTIVES else None


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def before_after(m: dict, key: str, spec: str = ".3f") -> str:
    """`before_<key>` → `after_<key>` of a stage's metrics."""
    return f"{fmt(m.get(f'before_{key}'), spec)} → {fmt(m.get(f'after_{key}'), spec)}"


def gold_text(m: dict) -> str:
    """The gold scorer's greedy and sampled scores of a stage that `evaluate`s."""
    return f"gold greedy {fmt(m.get('gold_greedy'))}, sampled {fmt(m.get('gold_sampled'))}"
