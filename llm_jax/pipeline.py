"""The assistant pipeline in one command: every stage in its own subdirectory, resumable, one table at the end.

    llm-jax pipeline --config configs/pipeline.py:tiny --workdir runs/pipeline

    run_pipeline(config, workdir) -> summary (its "table" is the markdown the command prints)

The config (configs/pipeline.py) lists the stages in `order`. A `train` stage is `llm_jax.training.run` of its
config spec plus overrides, in process, in `<workdir>/<stage>/`; with `evaluate` its model then answers the
held-out prompts of `config.eval` greedily and sampled, and the gold scorer grades the answers
(`<stage>/generations/{greedy,sampled}.jsonl`). Two kinds of stage sample K answers to each prompt of `prompts`
(`default_task`: the task's train prompts; the first `n_prompts`, 0: all) from the run `run` and have a judge
score them: `judge` is `gold` (the embedded task's scorer) or `reward` (the reward model of the run `reward_run`):

    pairs       on-policy preference pairs, `<stage>/pairs.jsonl` (llm_jax/rl/preference_pairs.py)
    import      `llm-jax import-hf` of the Hugging Face checkpoint `hf` (the `hf` preset: `{base}`, set with
                --config.base=DIR) into `<stage>/`, the run the post-training stages start from
    rejection   each prompt's best answer (at least `threshold`, when not None) as SFT records,
                `<stage>/sft.jsonl` (llm_jax/rl/rejection_sampling.py): the data of the next SFT round. Its
                stage.json keeps the figures of the table: kept prompts, the judge's and gold's mean scores of
                the kept answers against all samples (and gold's best possible pick), samples/s.
    arena       every model of `competitors` (name: run, chat_template, few_shot) answers the same first
                `n_prompts` of `prompts` (default_task: the held-out prompts), greedily unless `temperature`;
                the judge scores every answer; Bradley–Terry ratings (Elo scale) with bootstrap intervals and
                each model's win rate against `baseline` (llm_jax/eval/compare.py): `<stage>/arena.md`,
                arena.json, arena.png, one row of the table and `arena` in summary.json
    select      an arena (the same fields, less competitors and baseline) of the model of the stage `incumbent`
                and the stages `candidates`, win rates against the incumbent; the winner
                (llm_jax/eval/arena.py choose_winner: the best rating, if it beats the incumbent's by more than
                `margin`; ties keep the incumbent) is linked at `<stage>/model` → `../<winner>`, a relative link,
                so later stages name `{workdir}/<stage>/model` when the config is built, before the winner is
                known. The model of a select stage (as an incumbent) is the one it chose, named by its stage.
                Everything that reads a run reads it through the link (loading, generation, `train.init_from` and
                its lineage checks); stage.json records the winner, so a rerun skips the stage and keeps the link
    average     a run whose params are the element-wise mean of the runs `runs` (llm_jax/average.py: one
                architecture and tokenizer; LoRA merged, quantized bases dequantized), a run directory like
                any other; with `evaluate`, the gold-scored answers as a train stage's

They sample with key `seed + seed_offset`: stages that sample one model with different offsets draw different
answers.

Rounds. `config.rounds`, when the config has it (configs/rounds.py), groups stages: round 0 the model the
rounds start from, then each round's stages. The summary then adds a table of the gold scores of every round's
evaluated stages, its rejection stages' kept answers and its select stage's choice, every model's rating and
mean score and the one that went on (`rounds` in summary.json, `selection` of each round).

Resuming. A stage that finished, its evaluation included, leaves `<stage>/stage.json` (written whole, then
renamed): its summary, the metrics of the table and its wall time. A stage with one is skipped, so rerunning the
command after an interruption continues where it stopped; a train stage stopped midway resumes from its last
checkpoint (`llm-jax train`'s resume), and its recorded time is then that of the rerun. Deleting a stage's
stage.json reruns that stage alone (a finished train run only re-evaluates); the stages after it are not
rerun unless their stage.json files go too. A stage directory may be a link to a finished stage of another
pipeline run: its stage.json makes it skipped, so a longer pipeline reuses a shorter one's stages.

Failure. Every stage still to run has its config loaded and overridden before anything runs, so a bad override
fails at once; a stage that fails raises PipelineError naming it, and the stage.json files already written stay.

Wall times (`seconds`) are measured here around the whole stage, compilation and evaluation included.
"""
from __future__ import annotations

import json
import os
import time

from llm_jax.files import write_json_atomic, write_text_atomic
from llm_jax.pipeline_table import format_table, rounds_summary
from llm_jax.train.metrics import log_line, read_metrics

STAGE_FILE = "stage.json"
KINDS = ("train", "pairs", "rejection", "import", "arena", "select", "average")
JUDGES = ("gold", "reward")
PAIRS_FILE = "pairs.jsonl"
REJECTION_FILE = "sft.jsonl"
SELECTED_MODEL = "model"  # <select stage>/model: a relative link to the directory of the model that went on


class PipelineError(RuntimeError):
    """A pipeline config that cannot run, or a stage that failed (named)."""


def _substitute(text: str, workdir: str, config=None) -> str:
    """`{workdir}`, and `{base}` / `{chats}` where the config has those fields (the hf preset's checkpoint and SFT
    data)."""
    text = text.replace("{workdir}", workdir)
    for field in ("base", "chats"):
        if config is not None and field in config:
            text = text.replace("{" + field + "}", str(config[field]))
    return text


def train_overrides(config, name: str, workdir: str) -> list[str]:
    """A train stage's overrides as applied: the pipeline's seed first, then `overrides`, then `extra`."""
    stage = config.stages[name]
    overrides = [f"seed={config.seed}", *stage.overrides, *stage.extra.split()]
    return [_substitute(o, workdir, config) for o in overrides]


def check_config(config) -> None:
    """The stage list's own checks: every stage in `order` defined once, with a known kind."""
    order = list(config.order)
    if not order or len(set(order)) != len(order):
        raise PipelineError(f"pipeline order must name each stage once, got {order}")
    unknown = [n for n in order if n not in config.stages]
    if unknown:
        raise PipelineError(f"pipeline order names stages {unknown} that config.stages does not define; "
                            f"defined: {sorted(config.stages)}")
    for name in order:
        if config.stages[name].kind not in KINDS:
            raise PipelineError(f"stage {name!r} has kind {config.stages[name].kind!r}; known: {list(KINDS)}")
    in_rounds = [n for names in config.get("rounds") or () for n in names]
    if any(n not in order for n in in_rounds) or len(set(in_rounds)) != len(in_rounds):
        raise PipelineError(f"config.rounds must name stages of the order, each once; got {in_rounds}, order {order}")


def read_stage(directory: str) -> dict | None:
    path = os.path.join(directory, STAGE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def prompts_file(spec: str, split: str, n: int, path: str) -> str:
    """The prompts spec (`default_task`: the task's `split` prompts), or its first n records written to `path`."""
    from llm_jax.data import records
    from llm_jax.data.post_training import resolve_spec
    spec = resolve_spec(spec, "prompts", split)
    if n <= 0:
        return spec
    rows = []
    for _, record in records.iter_records(spec, "auto"):
        rows.append(json.dumps(record, ensure_ascii=False) + "\n")
        if len(rows) == n:
            break
    write_text_atomic(path, "".join(rows))
    return path


# ------------------------------------------------------------------------------------------------ stages

def _numbers(values: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _train_metrics(directory: str, summary: dict) -> dict:
    """The last eval logged (a finished run that is rerun reports only part of it), PPO's before and after."""
    evals = [m for m in read_metrics(directory) if any(k.startswith("eval_") for k in m)]
    metrics = _numbers(evals[-1]) if evals else {}
    metrics.pop("tokens", None)
    for key in ("before", "after"):
        metrics.update(_numbers(summary.get(key) or {}, f"{key}_"))
    metrics.update(_numbers({k: summary.get(k) for k in ("step", "final_loss")}))
    return metrics


def evaluate(run_dir: str, eval_config) -> dict:
    """Greedy and sampled answers to the held-out prompts, gold-scored, under `<run_dir>/generations/`."""
    from llm_jax.eval.judges import GoldJudge
    from llm_jax.generate import SamplingConfig
    from llm_jax.generation_io import generate_file
    out_dir = os.path.join(run_dir, "generations")
    prompts = prompts_file(eval_config.prompts, "eval", eval_config.n_prompts,
                           os.path.join(out_dir, "eval_prompts.jsonl"))
    metrics = {}
    for name, temperature in (("greedy", 0.0), ("sampled", eval_config.temperature)):
        result = generate_file(run_dir, prompts, os.path.join(out_dir, f"{name}.jsonl"),
                               SamplingConfig(max_new_tokens=eval_config.max_new_tokens, temperature=temperature),
                               batch_size=eval_config.batch_size, seed=eval_config.seed, progress=False,
                               judge=GoldJudge())
        metrics.update({f"gold_{name}": result.get("gold_score"), "eval_prompts": result["count"],
                        f"stopped_{name}": result["stopped"] / result["count"]})
    return metrics


class _Stopped(PipelineError):
    """A stage that stopped on SIGTERM: not failed, not complete."""


def _run_train(config, name: str, workdir: str, directory: str, train_config) -> dict:
    from llm_jax.eval.during_training import training_evals
    from llm_jax.training import run
    summary = run(train_config, directory, generative_evals=training_evals(train_config))
    if summary.get("stopped_early"):
        raise _Stopped(f"stage {name!r} stopped early (SIGTERM) with its checkpoint saved; rerun the same command "
                       "to resume")
    metrics = _train_metrics(directory, summary)
    if config.stages[name].evaluate:
        metrics.update(evaluate(directory, config.eval))
    return dict(objective=train_config.objective, summary=summary, metrics=metrics)


def _judge(config, name: str, workdir: str) -> str:
    """What scores a sampling stage's answers: "gold", or for `reward` the directory of `reward_run`."""
    stage = config.stages[name]
    if stage.judge == "gold":
        return "gold"
    if stage.judge != "reward":
        raise PipelineError(f"stage {name!r} has judge {stage.judge!r}; known: {list(JUDGES)}")
    if not stage.get("reward_run"):
        raise PipelineError(f"stage {name!r} has judge 'reward' but no reward_run (the reward model's run)")
    return _substitute(stage.reward_run, workdir)


def _threshold(config, name: str) -> float | None:
    """A rejection stage's threshold: None (keep every prompt's best) or a number (an override gives text)."""
    value = config.stages[name].threshold
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"stage {name!r} has threshold {value!r}; expected a number or None") from None


def _sampling(stage):
    from llm_jax.generate import SamplingConfig
    return SamplingConfig(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature)


def _sampling_inputs(config, name: str, workdir: str, directory: str) -> dict:
    """What the two sampling kinds share: policy run, judge, prompts file, k, sampling and its seed."""
    stage = config.stages[name]
    prompts = prompts_file(stage.prompts, "train", stage.n_prompts, os.path.join(directory, "prompts.jsonl"))
    return dict(policy_run=_substitute(stage.run, workdir), judge=_judge(config, name, workdir),
                prompts_spec=prompts, k=stage.k, sampling=_sampling(stage), batch_size=stage.batch_size,
                seed=config.seed + stage.get("seed_offset", 0), progress=False)


def _run_pairs(config, name: str, workdir: str, directory: str, _) -> dict:
    from llm_jax.rl.preference_pairs import preference_pairs
    stage = config.stages[name]
    summary = preference_pairs(**_sampling_inputs(config, name, workdir, directory),
                               out_path=os.path.join(directory, PAIRS_FILE), pairing=stage.pairs,
                               min_margin=stage.min_margin)
    return dict(summary=summary, metrics=_numbers(summary))


def _run_rejection(config, name: str, workdir: str, directory: str, _) -> dict:
    from llm_jax.rl.rejection_sampling import rejection_sample
    inputs = _sampling_inputs(config, name, workdir, directory)
    summary = rejection_sample(reward_run=inputs.pop("judge"), **inputs,
                               out_path=os.path.join(directory, REJECTION_FILE), threshold=_threshold(config, name))
    return dict(summary=summary, metrics=_numbers(summary))


def _arena_inputs(config, name: str, workdir: str) -> dict:
    """The arena's competitors, judge spec and options, checked (the runs themselves exist only once the stages
    before it ran)."""
    from llm_jax.eval.compare import Competitor
    stage = config.stages[name]
    competitors = [Competitor(n, _substitute(c.run, workdir, config), c.chat_template, c.few_shot)
                   for n, c in stage.competitors.items()]
    if stage.baseline not in stage.competitors:
        raise PipelineError(f"stage {name!r} has baseline {stage.baseline!r}, which is none of its competitors "
                            f"{sorted(stage.competitors)}")
    return dict(competitors=competitors, judge=_judge(config, name, workdir), sampling=_sampling(stage))


def _compare(config, name: str, workdir: str, directory: str, competitors: list, baseline: str) -> dict:
    """`compare` of `competitors` with the stage's prompts, judge, sampling and bootstrap, under `directory`."""
    from llm_jax.eval.compare import compare
    from llm_jax.eval.judges import load_judge
    stage = config.stages[name]
    return compare(competitors, _substitute(stage.prompts, workdir, config),
                   load_judge(_judge(config, name, workdir), batch_size=stage.batch_size), _sampling(stage),
                   directory, baseline=baseline, n_prompts=stage.n_prompts or None, batch_size=stage.batch_size,
                   seed=config.seed + stage.seed_offset, bootstrap=stage.bootstrap, plots=stage.plots)


def _arena_record(summary: dict) -> dict:
    """What stage.json keeps of an arena: its summary less the table, and each model's rating, mean score and win
    rate against the baseline as metrics."""
    metrics = {}
    for model, rating in summary["ratings"].items():
        metrics[f"rating_{model}"] = rating["value"]
        metrics[f"score_{model}"] = summary["mean_scores"][model]["value"]
    for model, result in summary["win_rates"].items():
        metrics[f"win_rate_{model}"] = result["rate"]["value"]
    return dict(summary={k: v for k, v in summary.items() if k != "table"}, metrics=metrics)


def _run_arena(config, name: str, workdir: str, directory: str, _) -> dict:
    inputs = _arena_inputs(config, name, workdir)
    return _arena_record(_compare(config, name, workdir, directory, inputs["competitors"],
                                  config.stages[name].baseline))


def model_of(workdir: str, stage: str) -> tuple[str, str]:
    """(name, run directory) of the model that the finished stage `stage` stands for: for a select stage the model
    that went on (named by the stage it came from, read through the stage's link), else the stage's own run."""
    record = read_stage(os.path.join(workdir, stage))
    if record is not None and record["kind"] == "select":
        return record["summary"]["winner"], os.path.join(workdir, stage, SELECTED_MODEL)
    return stage, os.path.join(workdir, stage)


def link_model(directory: str, stage: str) -> str:
    """`<directory>/model` → `../<stage>`, replaced whole: relative, so a moved or copied workdir keeps it."""
    os.makedirs(directory, exist_ok=True)
    link = os.path.join(directory, SELECTED_MODEL)
    tmp = f"{link}.tmp.{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.join(os.pardir, stage), tmp)
    os.replace(tmp, link)
    return link


def _run_select(config, name: str, workdir: str, directory: str, _) -> dict:
    """The arena of the incumbent (the model of the stage `incumbent`) and the `candidates`, judged as the stage
    says; the winner (`choose_winner`: ties keep the incumbent) is linked at `<stage>/model`."""
    from llm_jax.eval.arena import choose_winner
    from llm_jax.eval.compare import Competitor
    stage = config.stages[name]
    incumbent, incumbent_run = model_of(workdir, stage.incumbent)
    competitors = [Competitor(incumbent, incumbent_run),
                   *(Competitor(c, os.path.join(workdir, c)) for c in stage.candidates)]
    summary = _compare(config, name, workdir, directory, competitors, incumbent)
    ratings = {c.name: summary["ratings"][c.name]["value"] for c in competitors}
    means = {c.name: summary["mean_scores"][c.name]["value"] for c in competitors}
    winner = choose_winner(ratings, means, incumbent, margin=float(stage.margin))
    link_model(directory, winner)
    record = _arena_record(summary)
    record["summary"].update(incumbent=incumbent, candidates=list(stage.candidates), winner=winner,
                             margin=float(stage.margin), model=os.path.join(os.pardir, winner))
    record["metrics"]["kept_incumbent"] = int(winner == incumbent)
    return record


def _run_average(config, name: str, workdir: str, directory: str, _) -> dict:
    from llm_jax.average import average_runs
    stage = config.stages[name]
    summary = average_runs([_substitute(run, workdir, config) for run in stage.runs], directory)
    metrics = {k: v for k, v in _numbers(summary).items() if k != "seconds"}
    if stage.evaluate:
        metrics.update(evaluate(directory, config.eval))
    return dict(summary=summary, metrics=metrics)


def _import_source(config, name: str, workdir: str) -> str:
    source = _substitute(config.stages[name].hf, workdir, config)
    if not source:
        raise PipelineError(f"stage {name!r} imports a Hugging Face checkpoint, but none is named (set "
                            "--config.base=DIR)")
    return source


def _run_import(config, name: str, workdir: str, directory: str, _) -> dict:
    from llm_jax.hf.import_hf import import_hf
    summary = import_hf(_import_source(config, name, workdir), directory)
    return dict(summary=summary, metrics=_numbers(summary))


def _earlier(config, name: str, field: str, stages) -> None:
    """Every stage of `stages` (a select stage's models) runs before the stage `name`."""
    before = list(config.order)[:list(config.order).index(name)]
    for stage in stages:
        if stage not in before:
            raise PipelineError(f"stage {name!r} has {field} {stage!r}, which is not a stage before it; before it: "
                                f"{before}")


def _check_select(config, name: str, workdir: str) -> None:
    """A select stage's models are earlier stages, its judge and options can run, and its margin is a number."""
    from llm_jax.scaling.fit import check_bootstrap
    stage = config.stages[name]
    if not stage.candidates:
        raise PipelineError(f"stage {name!r} has no candidates to select from")
    _earlier(config, name, "incumbent", [stage.incumbent])
    _earlier(config, name, "candidate", list(stage.candidates))
    if isinstance(stage.margin, bool) or not isinstance(stage.margin, (int, float)) or not stage.margin >= 0:
        raise PipelineError(f"stage {name!r} has margin {stage.margin!r}; expected a number of Elo points >= 0")
    _judge(config, name, workdir)
    _sampling(stage)
    check_bootstrap(stage.bootstrap, 0.95)


def _check_average(config, name: str) -> None:
    runs = list(config.stages[name].runs)
    if len(runs) < 2:
        raise PipelineError(f"stage {name!r} averages {runs}; it needs at least 2 runs")


def _plan(config, name: str, workdir: str):
    """What a stage will run, loaded now so that a bad override or option fails before any stage runs."""
    stage = config.stages[name]
    if stage.kind == "import":  # the checkpoint's config maps to a model, or this fails naming the field
        from llm_jax.hf.import_hf import read_hf_config, run_config
        source = _import_source(config, name, workdir)
        return run_config(source, read_hf_config(source))
    if stage.kind == "train":
        from llm_jax.config_lib import load
        return load(_substitute(stage.config, workdir), train_overrides(config, name, workdir))
    if stage.kind == "arena":
        return _arena_inputs(config, name, workdir)
    if stage.kind == "select":
        return _check_select(config, name, workdir)
    if stage.kind == "average":
        return _check_average(config, name)
    _judge(config, name, workdir)
    _sampling(stage)
    if stage.kind == "pairs":
        from llm_jax.rl.preference_pairs import check_options
        check_options(stage.k, stage.min_margin, stage.pairs, stage.batch_size)
    else:
        from llm_jax.rl.rejection_sampling import check_options
        check_options(stage.k, _threshold(config, name), stage.batch_size)
    return None


def _describe(config, name: str, workdir: str) -> str:
    stage = config.stages[name]
    if stage.kind == "train":
        return f"train {os.path.relpath(_substitute(stage.config, workdir))}"
    if stage.kind == "import":
        return f"import-hf {_substitute(stage.hf, workdir, config)}"
    if stage.kind == "arena":
        return f"arena of {', '.join(stage.competitors)}, judge {stage.judge}"
    if stage.kind == "select":
        return (f"select among the model of {stage.incumbent} and {', '.join(stage.candidates)}, judge "
                f"{stage.judge}")
    if stage.kind == "average":
        return f"average of {', '.join(_substitute(run, workdir, config) for run in stage.runs)}"
    judge = stage.judge
    if judge == "reward":
        judge = f"reward model {_substitute(stage.get('reward_run') or '', workdir)}"
    what = "pairs" if stage.kind == "pairs" else "rejection sampling"
    return f"{what} from {_substitute(stage.run, workdir)}, judge {judge}, k={stage.k}"


_RUNNERS = {"train": _run_train, "pairs": _run_pairs, "rejection": _run_rejection, "import": _run_import,
            "arena": _run_arena, "select": _run_select, "average": _run_average}


def _settings(config, name: str) -> dict:
    """What a stage ran with, as stage.json records it (JSON: tuples read back as lists)."""
    return json.loads(json.dumps(dict(seed=config.seed, stage_config=config.stages[name].to_dict())))


def run_pipeline(config, workdir: str) -> dict:
    """Runs every stage not yet complete (module docstring), then writes and returns the summary."""
    check_config(config)
    start = time.perf_counter()
    done = {name: read_stage(os.path.join(workdir, name)) for name in config.order}
    plans = {}
    for name in config.order:
        if done[name] is None:
            try:
                plans[name] = _plan(config, name, workdir)
            except Exception as e:
                raise PipelineError(f"pipeline stage {name!r} ({_describe(config, name, workdir)}): {e}") from e

    records, ran = {}, []
    for name in config.order:
        directory = os.path.join(workdir, name)
        elapsed = f"[{time.perf_counter() - start:7.1f} s]"
        if done[name] is not None:
            records[name] = done[name]
            log_line(f"pipeline {elapsed} {name}: complete ({directory}/{STAGE_FILE}, {done[name]['seconds']:.1f} s "
                     "when it ran), skipped")
            if _settings(config, name) != {k: done[name].get(k) for k in ("seed", "stage_config")}:
                log_line(f"pipeline: note: {name}'s settings differ from those it ran with; delete "
                         f"{directory}/{STAGE_FILE} to rerun it")
            continue
        log_line(f"pipeline {elapsed} {name}: start ({_describe(config, name, workdir)})")
        t0 = time.perf_counter()
        try:
            record = _RUNNERS[config.stages[name].kind](config, name, workdir, directory, plans[name])
        except _Stopped:
            raise
        except Exception as e:
            raise PipelineError(f"pipeline stage {name!r} ({_describe(config, name, workdir)}) failed: "
                                f"{type(e).__name__}: {e}") from e
        record = dict(stage=name, kind=config.stages[name].kind, seconds=time.perf_counter() - t0,
                      **_settings(config, name), **record)
        write_json_atomic(os.path.join(directory, STAGE_FILE), record)
        records[name], ran = record, ran + [name]
        log_line(f"pipeline [{time.perf_counter() - start:7.1f} s] {name}: done in {record['seconds']:.1f} s")

    total = sum(r["seconds"] for r in records.values())
    rounds = rounds_summary(config, records)
    table = format_table(config, records, total, rounds)
    arenas = {name: r["summary"] for name, r in records.items() if r["kind"] == "arena"}
    summary = dict(workdir=workdir, order=list(config.order), ran=ran, total_seconds=total,
                   elapsed_seconds=time.perf_counter() - start, table=table, rounds=rounds, **arenas,
                   stages={name: dict(seconds=r["seconds"], metrics=r["metrics"], skipped=name not in ran)
                           for name, r in records.items()})
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    write_text_atomic(os.path.join(workdir, "summary.md"), table)
    return summary
