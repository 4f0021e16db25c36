"""Scaling sweeps: one config expands into pretraining runs over a model-size dial and budgets, runs them, and
collects the results table the fits read (`llm_jax/scaling/results.py`).

    llm-jax sweep --config configs/sweep.py:isoflop --workdir runs/sweep [--processes 2] [--dry-run]
    llm-jax scaling-fit runs/sweep/results.csv --approach 3

    runs = expand(config)                    # the runs, each with its steps, tokens and FLOPs (nothing trained)
    summary = run_sweep(config, workdir)     # trains what is missing, writes <workdir>/results.csv

The config (configs/sweep.py) names a base training config (`base`: a config file) and a size dial: each value
of `sizes` is put into the `size_arg` template to give that file's argument (`size=depth{size},aspect=32`).
`mode` says what `budgets` are:

    tokens      training tokens D: every size trains on every D (a grid, for Kaplan's L(N, D) and Approach 3)
    isoflop     training FLOPs C: every size trains on D = C / (FLOPs per token) tokens, so all the runs of a
                budget spend the same compute (Chinchilla's IsoFLOP profiles, Approach 2). FLOPs per token are
                the exact count of `scaling/flops.py` (`flops_per_token="exact"`) or 6·N_total ("6N").

A run trains round(D / tokens per step) steps (so its D and FLOPs are those of whole steps, and the table
reports those); one with fewer than `min_steps` or (when `max_steps` > 0) more than `max_steps` is left out of the
sweep and listed as such, so one list of sizes can serve budgets far apart. Every run's
learning-rate schedule spans its own steps (warmup `warmup_fraction` of them), and it evaluates on the held-out
split `evals` times, the last at its final step.

All runs share one tokenizer (`tokenizer`, or one trained into `<workdir>/tokenizer.model` from the base
config's settings) and one tokenized-corpus cache (`cache_dir`, default `<workdir>/data`; sweeps of one corpus
and tokenizer may share it), so their losses are in the same units.

Each run lives in `<workdir>/<name>/` (e.g. `C3.6e12-depth4`) and is `llm-jax train` of the base config with
the sweep's `overrides` and its own steps, warmup, eval interval and seed. A run that finished leaves
`<name>/sweep.json` (its row of the table, written whole); rerunning the command skips those and resumes a run
stopped midway from its checkpoint. With `processes` > 1 the runs go to that many `llm-jax train` processes at
once (each with its log in `<name>/train.log`); on a CPU, give each process its share of the cores. A run that
fails (a diverged loss, say) does not stop the others: the table holds the runs that finished, and the command
names the failures and exits 1.

A run whose D exceeds the training split repeats data (epochs > 1): the command names those runs before training,
since repetition changes the loss a scaling law describes (Muennighoff et al. 2023), and the table says how many
epochs each run saw. The table's rows are derived from each run's `metrics.jsonl`, so they never go stale.

The table, `<workdir>/results.csv`, has one row per finished run (sorted by budget, then size):

    name, size, budget, steps, tokens_per_step, n_layers, d_model,
    N           Kaplan et al.'s non-embedding parameters      N_total   every parameter (Chinchilla's N)
    D           training tokens                               epochs    D / the training split's tokens
    flops       exact training FLOPs (per token × D)
    flops_6ND   6·N_total·D, for comparison
    loss        the held-out loss at the last step            best_loss the lowest held-out loss logged
    train_loss  the training loss at the last step            entropy_floor  the corpus' entropy per token
    seconds     the run's wall time                           tokens_per_s   its mean training throughput
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from llm_jax import config_lib
from llm_jax.files import write_json_atomic, write_text_atomic
from llm_jax.train.metrics import log_line, read_metrics

MODES = ("tokens", "isoflop")
FLOPS_PER_TOKEN = ("exact", "6N")
RUN_FILE = "sweep.json"
RESULTS_FILE = "results.csv"
COLUMNS = ("name", "size", "budget", "steps", "tokens_per_step", "n_layers", "d_model", "N", "N_total", "D",
           "epochs", "flops", "flops_6ND", "loss", "best_loss", "train_loss", "entropy_floor", "seconds",
           "tokens_per_s")


class SweepError(RuntimeError):
    """A sweep config that cannot expand, or runs that failed (named)."""


@dataclasses.dataclass(frozen=True)
class SweepRun:
    name: str
    size: str             # the dial's value, as given
    budget: float         # tokens or FLOPs, as the mode says
    spec: str             # the base config file and its argument
    overrides: tuple[str, ...]
    steps: int
    tokens_per_step: int
    flops_per_token: int  # the exact count, whatever the mode divided by
    n: int                # Kaplan's non-embedding parameters
    n_total: int
    n_layers: int
    d_model: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> int:
        return self.flops_per_token * self.tokens


def _number(value: float) -> str:
    """A budget as a short name: 3.6e12 → "3.6e12", 1000000 → "1e6" (three significant digits)."""
    exponent = math.floor(math.log10(value))
    mantissa = f"{value / 10 ** exponent:.3g}"
    if mantissa == "10":
        mantissa, exponent = "1", exponent + 1
    return f"{mantissa}e{exponent}"


def check_config(config) -> None:
    if config.mode not in MODES:
        raise SweepError(f"sweep mode {config.mode!r} is not one of {list(MODES)}")
    if config.flops_per_token not in FLOPS_PER_TOKEN:
        raise SweepError(f"sweep flops_per_token {config.flops_per_token!r} is not one of {list(FLOPS_PER_TOKEN)}")
    sizes, budgets = list(config.sizes), list(config.budgets)
    if not sizes or len(set(map(str, sizes))) != len(sizes):
        raise SweepError(f"sweep sizes must be distinct values of the dial, got {sizes}")
    if not budgets or any(not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0) for b in budgets):
        raise SweepError(f"sweep budgets must be positive numbers ({config.mode}), got {budgets}")
    if len({_number(b) for b in budgets}) != len(budgets):
        raise SweepError(f"sweep budgets must differ (in 3 significant digits), got {budgets}")
    if "{size}" not in config.size_arg:
        raise SweepError(f"sweep size_arg {config.size_arg!r} must contain {{size}}")
    if not 0 <= config.warmup_fraction < 1:
        raise SweepError(f"sweep warmup_fraction must be in [0, 1), got {config.warmup_fraction}")
    for name in ("evals", "checkpoints", "min_steps"):
        if config[name] < 1:
            raise SweepError(f"sweep {name} must be >= 1, got {config[name]}")


def _base_path(config) -> str:
    """`base` as given, or relative to the project's configs/ folder (`configs/pretrain.py` from anywhere)."""
    if os.path.isfile(config.base):
        return config.base
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidate = os.path.join(project, config.base)
    if os.path.isfile(candidate):
        return candidate
    raise SweepError(f"sweep base config {config.base!r} does not exist (nor under {project})")


def _load_run_config(spec: str, overrides):
    from llm_jax.config_lib import load  # the same loading as `llm-jax train` and the pipeline's stages
    return load(spec, list(overrides))


def expand(config) -> tuple[list[SweepRun], list[dict]]:
    """The sweep's runs in order (by budget, then size), and the (size, budget) pairs left out for having fewer
    than `min_steps` or more than `max_steps` steps. Loads each size's config once; trains nothing."""
    from llm_jax.model.config import ModelConfig
    from llm_jax.scaling import flops

    check_config(config)
    base = _base_path(config)
    runs, skipped = [], []
    for size in config.sizes:
        spec = f"{base}:{config.size_arg.format(size=size)}"
        try:
            run_config = _load_run_config(spec, config.overrides)
        except (config_lib.ConfigError, ValueError) as e:
            raise SweepError(f"sweep size {size!r} ({spec}): {e}") from e
        model_cfg = ModelConfig.from_config(run_config.model)
        counts = flops.param_counts(model_cfg)
        exact = flops.training_flops_per_token(model_cfg, run_config.data.seq_len)
        tokens_per_step = run_config.data.batch_size * run_config.data.seq_len
        per_token = exact if config.flops_per_token == "exact" else 6 * counts["total"]
        for budget in config.budgets:
            tokens = budget if config.mode == "tokens" else budget / per_token
            steps = round(tokens / tokens_per_step)
            prefix = "D" if config.mode == "tokens" else "C"
            name = f"{prefix}{_number(budget)}-{config.size_label.format(size=size)}"
            if steps < config.min_steps or 0 < config.max_steps < steps:
                skipped.append(dict(name=name, size=str(size), budget=budget, steps=steps))
                continue
            warmup = max(1, round(config.warmup_fraction * steps)) if config.warmup_fraction else None
            own = [f"train.steps={steps}", f"train.eval_every={max(1, steps // config.evals)}",
                   f"train.checkpoint_every={max(1, steps // config.checkpoints)}", f"seed={config.seed}"]
            if warmup is not None:
                own.append(f"optim.warmup_steps={warmup}")
            runs.append(SweepRun(name, str(size), float(budget), spec, (*config.overrides, *own), steps,
                                 tokens_per_step, exact, counts["kaplan"], counts["total"], model_cfg.n_layers,
                                 model_cfg.d_model))
    runs.sort(key=lambda r: (r.budget, r.n_total))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SweepError(f"sweep run names repeat ({names}): size_label must tell the sizes apart")
    return runs, skipped


def plan_table(runs: list[SweepRun], skipped: list[dict]) -> str:
    """The runs a sweep would train, as markdown: steps, tokens, FLOPs and tokens per parameter."""
    lines = ["| run | N | N_total | steps | D | FLOPs | D/N_total |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.n:,} | {r.n_total:,} | {r.steps:,} | {r.tokens:,} | {r.flops:.3g} | "
                     f"{r.tokens / r.n_total:.2g} |")
    total = sum(r.flops for r in runs)
    lines.append(f"\n{len(runs)} runs, {total:.3g} training FLOPs in all")
    if skipped:
        lines.append("left out (steps outside [min_steps, max_steps]): " +
                     ", ".join(f"{s['name']} ({s['steps']} steps)" for s in skipped))
    return "\n".join(lines) + "\n"


def _prepare_shared(config, runs: list[SweepRun], workdir: str) -> tuple[list[str], int]:
    """The tokenizer and tokenized corpus every run shares, made once here: the overrides that point at them,
    and the training split's size in tokens."""
    from llm_jax.data.pipeline import tokenize_corpus
    from llm_jax.data.tokenizer_stage import prepare_tokenizer

    first = _load_run_config(runs[0].spec, runs[0].overrides)
    if config.tokenizer:
        first.tokenizer.path = config.tokenizer
    tokenizer = prepare_tokenizer(first, workdir)  # <workdir>/tokenizer.model: copied, or trained once
    cache_dir = config.cache_dir or os.path.join(workdir, "data")
    splits, _ = tokenize_corpus(first.data, tokenizer, cache_dir)
    return [f"tokenizer.path={tokenizer.path}", f"data.cache_dir={cache_dir}"], splits["train"].n_targets


def _warn_about_repetition(runs: list[SweepRun], train_tokens: int) -> list[str]:
    over = [r for r in runs if r.tokens > train_tokens]
    if over:
        most = max(r.tokens for r in over) / train_tokens
        log_line(f"sweep: {len(over)} of {len(runs)} runs train past one epoch of the {train_tokens:,}-token "
                 f"training split (up to {most:.1f} epochs): {', '.join(r.name for r in over)}")
    return [r.name for r in over]


def _row(run: SweepRun, run_dir: str, seconds: float) -> dict:
    """The run's row of the results table, from its metrics.jsonl."""
    metrics = read_metrics(run_dir)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    finals = [m for m in metrics if m.get("step") == run.steps]
    if not evals or not finals:
        raise SweepError(f"run {run.name} ({run_dir}) did not reach step {run.steps} with a held-out eval")
    first = metrics[0]
    train_tokens = first.get("n_train_tokens")
    train = [m for m in finals if "loss" in m]
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    return dict(name=run.name, size=run.size, budget=run.budget, steps=run.steps,
                tokens_per_step=run.tokens_per_step, n_layers=run.n_layers, d_model=run.d_model,
                N=run.n, N_total=run.n_total, D=run.tokens,
                epochs=round(run.tokens / train_tokens, 4) if train_tokens else "", flops=run.flops,
                flops_6ND=6 * run.n_total * run.tokens, loss=evals[-1], best_loss=min(evals),
                train_loss=train[-1]["loss"] if train else "",
                entropy_floor=first.get("source_entropy_nats_per_token", ""), seconds=round(seconds, 2),
                tokens_per_s=round(sum(speeds) / len(speeds), 1) if speeds else "")


def _finished(run: SweepRun, run_dir: str) -> dict | None:
    """The row of a finished run (rebuilt from its metrics, with its recorded time), after checking it was
    trained as the sweep now asks; None for a run not finished."""
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("spec") != run.spec or list(record.get("overrides", ())) != list(run.overrides):
        raise SweepError(f"run {run.name} in {run_dir} finished with a different config ({record.get('spec')} "
                         f"{record.get('overrides')}) than the sweep now asks ({run.spec} {list(run.overrides)}): "
                         "use a new --workdir, or delete that run directory to retrain it")
    return _row(run, run_dir, record["row"]["seconds"])


def _train_in_process(run: SweepRun, run_dir: str, shared: list[str]) -> None:
    from llm_jax.training import run as train
    train(_load_run_config(run.spec, (*run.overrides, *shared)), run_dir)


def _train_in_subprocess(run: SweepRun, run_dir: str, shared: list[str]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "train.log")
    command = [sys.executable, "-m", "llm_jax.cli", "train", "--config", run.spec, "--workdir", run_dir,
               *(f"--config.{o}" for o in (*run.overrides, *shared))]
    with open(log, "a", encoding="utf-8") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log, encoding="utf-8") as f:
            last = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
        raise SweepError(f"exit status {code}: {last[0]} (log: {log})")


def _complete(run: SweepRun, run_dir: str, shared: list[str], train) -> dict:
    started = time.perf_counter()
    log_line(f"sweep: {run.name}: {run.steps:,} steps, {run.tokens:,} tokens, {run.flops:.3g} FLOPs")
    train(run, run_dir, shared)
    row = _row(run, run_dir, time.perf_counter() - started)
    write_json_atomic(os.path.join(run_dir, RUN_FILE), dict(row=row, spec=run.spec, overrides=list(run.overrides)))
    log_line(f"sweep: {run.name}: held-out loss {row['loss']:.4f} (best {row['best_loss']:.4f}) in "
             f"{row['seconds']:.0f} s")
    return row


def write_results(rows: list[dict], path: str) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())


def results_table(rows: list[dict]) -> str:
    lines = ["| run | N | D | epochs | FLOPs | loss | best | s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['N']:,} | {r['D']:,} | {r['epochs']} | {r['flops']:.3g} | {r['loss']:.4f} | "
              f"{r['best_loss']:.4f} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_sweep(config, workdir: str, *, processes: int | None = None, dry_run: bool = False) -> dict:
    """Trains the sweep's unfinished runs and writes `<workdir>/results.csv`; see the module doc.

    Returns the summary: `results` (the CSV's path), `rows`, `failed` ({name: error}), `left_out` (runs outside
    [min_steps, max_steps]), `repeated` (runs trained now that see the training split more than once) and
    `table` (markdown). With `dry_run`, trains nothing and returns the plan (`table`).
    """
    processes = config.processes if processes is None else processes
    if processes < 1:
        raise SweepError(f"sweep processes must be >= 1, got {processes}")
    runs, skipped = expand(config)
    if not runs:
        raise SweepError(f"every run of the sweep has steps outside [min_steps={config.min_steps}, max_steps="
                         f"{config.max_steps}]: {[(s['name'], s['steps']) for s in skipped]}")
    plan = plan_table(runs, skipped)
    if dry_run:
        return dict(runs=[dataclasses.asdict(r) for r in runs], left_out=skipped, table=plan)
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(os.path.join(workdir, "plan.md"), plan)
    rows = {r.name: _finished(r, os.path.join(workdir, r.name)) for r in runs}
    todo = [r for r in runs if rows[r.name] is None]
    log_line(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished already, {len(todo)} to train"
             + (f" in {processes} processes" if todo and processes > 1 else ""))
    failed: dict[str, str] = {}
    repeated: list[str] = []
    if todo:
        shared, train_tokens = _prepare_shared(config, runs, workdir)
        repeated = _warn_about_repetition(runs, train_tokens)
        train = _train_in_process if processes == 1 else _train_in_subprocess

        def attempt(run: SweepRun) -> None:
            try:
                rows[run.name] = _complete(run, os.path.join(workdir, run.name), shared, train)
            except Exception as e:  # one failed run (diverged, killed) must not lose the others
                failed[run.name] = f"{type(e).__name__}: {e}"
                log_line(f"sweep: {run.name} failed: {failed[run.name]}")

        if processes == 1:
            for run in todo:
                attempt(run)
        else:
            with ThreadPoolExecutor(processes) as pool:
                list(pool.map(attempt, todo))
    done = [rows[r.name] for r in runs if rows[r.name] is not None]
    path = os.path.join(workdir, RESULTS_FILE)
    write_results(done, path)
    return dict(results=path, rows=done, failed=failed, left_out=skipped, repeated=repeated,
                table=results_table(done))
