"""An evaluation config (configs/eval.py) run: `run_eval_config(config, workdir) -> summary`.

    llm-jax eval --config configs/eval.py:arena --workdir evals/arena

It dispatches on `config.kind`, writes `<workdir>/summary.json` and returns the summary, whose `table` is markdown
to print:

    arena       compare() of the competitors whose run directories exist, files under the workdir (compare.py)
    win_rate    compare() of the two runs a and b: a's win rate against b
    generative  evaluate_task() of one run (generative.py), files under the workdir
    perplexity  perplexity() of one run (perplexity.py)
    icl         icl_curve() of the base run in plain text, and evaluate_task() of the sft run zero-shot in chat,
                files under <workdir>/base and <workdir>/sft

`{pipeline}` in a run directory is `config.pipeline`. A competitor (arena, icl) whose run directory does not exist is
skipped with a warning line, and listed as skipped in the summary, unless `require_all`; then it is a ConfigError,
as is every field that cannot be right, named with its value, before anything runs.
"""
from __future__ import annotations

import os

from llm_jax.config_lib import ConfigError
from llm_jax.eval.compare import Competitor, compare
from llm_jax.eval.generative import evaluate_task, icl_curve
from llm_jax.eval.perplexity import perplexity
from llm_jax.files import write_json_atomic
from llm_jax.generate import SamplingConfig
from llm_jax.train.metrics import log_line
from llm_jax.train.run_record import make_workdir

SUMMARY_FILE = "summary.json"
COMPETITOR_FIELDS = ("run", "chat_template", "few_shot")


def _run_path(config, run: str, field: str) -> str:
    if not isinstance(run, str) or not run.strip():
        raise ConfigError(f"config.{field} is empty: name a run directory (--config.{field}=DIR)")
    return run.replace("{pipeline}", config.get("pipeline", ""))


def _sampling(config) -> SamplingConfig:
    try:
        return SamplingConfig(**dict(config.sampling))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.sampling {dict(config.sampling)}: {e}") from None


def _n_prompts(config) -> int | None:
    n = config.n_prompts
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"config.n_prompts must be a number ≥ 0 (0: every prompt), got {n!r}")
    return n or None


def _present(config, named_runs: dict[str, str], what: str) -> tuple[dict[str, str], list[dict]]:
    """(name -> run directory of those that exist, the skipped ones); with require_all a missing one is an error."""
    present, skipped = {}, []
    for name, run in named_runs.items():
        if os.path.isdir(run):
            present[name] = run
        elif config.require_all:
            raise ConfigError(f"{what} {name!r}: run directory {run!r} does not exist (config.require_all=True)")
        else:
            log_line(f"eval: warning: skipping {what} {name!r}: run directory {run!r} does not exist")
            skipped.append(dict(name=name, run=run))
    return present, skipped


def competitors(config) -> tuple[list[Competitor], list[dict]]:
    """The competitors of `config.competitors` whose runs exist, and the skipped ones."""
    fields = {}
    for name, c in config.competitors.items():
        unknown = sorted(set(c.keys()) - set(COMPETITOR_FIELDS))
        if unknown:
            raise ConfigError(f"config.competitors.{name} has unknown field(s) {unknown}; known: "
                              f"{list(COMPETITOR_FIELDS)}")
        fields[name] = c
    runs, skipped = _present(config, {name: _run_path(config, c.get("run", ""), f"competitors.{name}.run")
                                      for name, c in fields.items()}, "competitor")
    kept = [Competitor(name, run, bool(fields[name].get("chat_template", True)),
                       fields[name].get("few_shot", 0)) for name, run in runs.items()]
    return kept, skipped


def _compare(config, workdir: str) -> dict:
    kept, skipped = competitors(config)
    names = [c.name for c in kept]
    if config.baseline not in names:
        why = "was skipped (its run directory does not exist)" if config.baseline in config.competitors else \
            "is not a competitor"
        raise ConfigError(f"config.baseline {config.baseline!r} {why}; competitors: {names}")
    if len(kept) < 2:
        raise ConfigError(f"only {len(kept)} competitor(s) have a run directory ({names}); a comparison needs 2; "
                          f"skipped: {[s['run'] for s in skipped]}")
    result = compare(kept, config.prompts, config.judge, _sampling(config), workdir, baseline=config.baseline,
                     n_prompts=_n_prompts(config), batch_size=config.batch_size, seed=config.seed,
                     bootstrap=config.bootstrap, confidence=config.confidence, stop=config.stop, plots=config.plots)
    return dict(result, skipped=skipped)


def _generative(config, workdir: str) -> dict:
    result = evaluate_task(_run_path(config, config.run, "run"), config.task, config.judge, k=config.k,
                           pool=config.pool or None, chat_template=config.chat_template, sampling=_sampling(config),
                           n_prompts=_n_prompts(config), out_dir=workdir, stop=config.stop, seed=config.seed,
                           batch_size=config.batch_size, bootstrap=config.bootstrap, confidence=config.confidence)
    table = ("| run | task | k | format | judge | score | n | stopped |\n|---|---|---:|---|---|---:|---:|---:|\n"
             f"{_score_row(result, result['run'], result['task'])}")
    return dict(result, table=table)


def _score_row(r: dict, *names: str) -> str:
    interval = "" if r["interval"] is None else f" [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
    return (f"| {' | '.join(names)} | {r['k']} | {r['format']} | {r['judge']} | {r['score']:.3f}{interval} | "
            f"{r['n']} | {r['stopped']:.2f} |\n")


def _perplexity(config, workdir: str) -> dict:
    if config.mixture and config.data:
        raise ConfigError(f"config.data={config.data!r} and config.mixture both name text: set one")
    data = dict(config.mixture) if config.mixture else (config.data or None)
    result = perplexity(_run_path(config, config.run, "run"), data, batch_size=config.batch_size,
                        max_batches=config.max_batches or None, split=config.split)
    if "components" in result:
        parts = [*result["components"].items(), ("all", result)]
    else:
        parts = [(result["data"], result)]
    lines = ["| data | tokens | loss (nats/token) | perplexity |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {p['tokens']:,} | {p['loss']:.4f} | {p['perplexity']:.2f} |" for name, p in parts]
    return dict(result, table="\n".join(lines) + "\n")


def _icl(config, workdir: str) -> dict:
    runs, skipped = _present(config, {"base": _run_path(config, config.base_run, "base_run"),
                                      "sft": _run_path(config, config.sft_run, "sft_run")}, "run")
    if not runs:
        raise ConfigError(f"neither the base run nor the sft run exists: {[s['run'] for s in skipped]}")
    options = dict(sampling=_sampling(config), n_prompts=_n_prompts(config), stop=config.stop, seed=config.seed,
                   batch_size=config.batch_size, bootstrap=config.bootstrap, confidence=config.confidence)
    summary, lines = dict(skipped=skipped), []
    if "base" in runs:
        curve = icl_curve(runs["base"], config.task, tuple(config.ks), config.judge,
                          chat_template=config.base_chat_template, out_dir=os.path.join(workdir, "base"), **options)
        summary["base"] = curve
        lines += [_score_row(p, "base", runs["base"]) for p in curve["points"].values()]
    if "sft" in runs:
        summary["sft"] = evaluate_task(runs["sft"], config.task, config.judge, k=0, chat_template=True,
                                       out_dir=os.path.join(workdir, "sft"), **options)
        lines.append(_score_row(summary["sft"], "sft", runs["sft"]))
    head = "| model | run | k | format | judge | score | n | stopped |\n|---|---|---:|---|---|---:|---:|---:|\n"
    return dict(summary, table=head + "".join(lines))


KINDS = {"arena": _compare, "win_rate": _compare, "generative": _generative, "perplexity": _perplexity, "icl": _icl}


def run_eval_config(config, workdir: str) -> dict:
    """Runs the evaluation `config.kind` names (module docstring); writes and returns its summary."""
    kind = config.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"config.kind={kind!r} is not an evaluation; known: {list(KINDS)}")
    make_workdir(workdir)
    summary = dict(kind=kind, workdir=workdir, **KINDS[kind](config, workdir))
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
    return summary
