"""The `llm-jax` command.

    llm-jax prepare   --config configs/prepare.py:default --workdir runs/data [--config.processes=8 ...]
    llm-jax classifier --config configs/classifier.py:quality --workdir runs/quality_clf
    llm-jax tokenizer --config configs/tokenizer.py:default --workdir runs/tok
    llm-jax train     --config configs/pretrain.py:tiny --workdir runs/pre [--config.optim.lr=1e-3 ...]
    llm-jax memory    --config configs/sft.py:tiny [--config.model.lora_rank=16 ... --json]
    llm-jax generate  --run runs/sft --prompts prompts.jsonl [--out answers.jsonl --max-new-tokens 64 ...]
    llm-jax import-hf --hf /models/Qwen2.5-0.5B-Instruct --workdir runs/qwen [--config.mesh.tensor=2 ...]
    llm-jax export-hf --run runs/qwen-dpo --out exports/qwen-dpo [--overwrite --dtype bfloat16]
    llm-jax rejection-sample --run runs/sft --reward-run runs/rm --prompts default_task --k 8 --out rs.jsonl
    llm-jax preference-pairs --run runs/sft --judge runs/rm --prompts default_task --k 8 --out pairs.jsonl
    llm-jax pipeline  --config configs/pipeline.py:tiny --workdir runs/pipeline [--config.seed=1 ...]
    llm-jax sweep     --config configs/sweep.py:isoflop --workdir runs/sweep [--processes 2 --dry-run]
    llm-jax scaling-fit results.csv --n-col N --d-col D --loss-col loss --approach 3 [--bootstrap 1000]
    llm-jax eval      --run runs/sft --lm-eval-tasks hellaswag,arc_easy --num-fewshot 5 --out evals/sft
    llm-jax eval      --config configs/eval.py:arena --workdir evals/arena [--config.judge=runs/rm ...]

`prepare` cleans, deduplicates and tokenizes raw documents into shards with a report, resuming where it stopped
(see llm_jax/data/prepare/prepare_stage.py); a bad config exits 2, bad input data 1.
`classifier` trains a fastText-style quality or toxicity classifier on positive and negative examples, reports
held-out precision and recall, and saves it for prepare's classifier steps
(see llm_jax/data/prepare/classifier_stage.py); a bad config exits 2, bad example data 1.
`train` runs whichever objective the config names and resumes when the workdir holds a checkpoint.
`memory` says, before launch, how much accelerator memory each device needs to train the config (params,
optimizer state, the compiled step's temporaries with the gradients among them): the train step compiled on
abstract shapes, nothing allocated (see llm_jax/train/memory.py); `--json` prints one JSON object. It measures the
objectives of the shared loop (lm, sft, reward, dpo); a bad config, or objective rl, exits 2.
`generate` answers every prompt of a file with a finished run's model (see llm_jax/generation_io.py).
`import-hf` turns a local Hugging Face checkpoint (Llama, Mistral, Qwen2/3, Gemma 3) into a run directory that every
stage starts from with `train.init_from` (see llm_jax/hf/import_hf.py); `export-hf` writes any run as a checkpoint
that transformers and vLLM load (see llm_jax/hf/export_hf.py). Both exit 1 on a checkpoint or run they cannot use.
`rejection-sample` keeps the reward model's (or another judge's) best of K answers per prompt as SFT data
(see llm_jax/rl/rejection_sampling.py). `preference-pairs` writes a judge's (a reward run, `gold`, ...) best
against its worst of K answers per prompt as preference records (see llm_jax/rl/preference_pairs.py).
`pipeline` runs every stage of a pipeline config, skipping those already complete, and prints a table of
their results (see llm_jax/pipeline.py); its overrides apply to the pipeline config.
`sweep` trains the runs of a scaling sweep (sizes × token or FLOP budgets) that are not finished and writes their
results table, `<workdir>/results.csv` (see llm_jax/scaling/sweep.py); its overrides apply to the sweep config.
`eval` runs lm-evaluation-harness tasks on a run (see llm_jax/eval/harness.py; `pip install -e '.[eval]'`), or an
evaluation config: an arena of several runs, a win rate, generative tasks, perplexity, in-context learning
(see llm_jax/eval/configured.py and configs/eval.py).
`scaling-fit` fits a scaling law (Kaplan's, or Chinchilla's Approach 1, 2 or 3) to a CSV of runs, prints the
coefficients with bootstrap intervals as JSON and writes plots (see llm_jax/scaling/fit.py and report.py).

Exit codes, every command: 0 done; 2 a bad config, override, option or mesh (nothing was written); 1 bad input
data, a missing or damaged checkpoint or run, a diverged run, a full disk, or another failure. The error is one
line on stderr naming the thing and its value; `--debug` (anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from llm_jax import config_lib


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train with the objective the config names (resumes automatically)"),
                            ("tokenizer", "train a sentencepiece tokenizer on the config's corpus"),
                            ("prepare", "clean, filter, deduplicate and tokenize raw documents into shards and a "
                                        "report (see llm_jax/data/prepare/prepare_stage.py)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", required=True, help="path/to/config.py[:arg]")
        sub.add_argument("--workdir", required=True, help="the run directory")
        sub.add_argument("--distributed", action="store_true",
                         help="join a multi-host job with jax.distributed.initialize(): on TPU pods, SLURM, "
                              "Open MPI and similar clusters it finds its peers itself; elsewhere give the three "
                              "options below")
        sub.add_argument("--coordinator", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
        sub.add_argument("--num-processes", type=int)
        sub.add_argument("--process-id", type=int)
    sub = commands.add_parser("memory", help="per-device memory of the config's train step before launch: params, "
                                             "optimizer, temporaries (see llm_jax/train/memory.py)")
    sub.add_argument("--config", required=True, help="path/to/config.py[:arg], as for train")
    sub.add_argument("--json", action="store_true", help="print one JSON object (the per-device bytes) instead of "
                                                         "the table")
    sub = commands.add_parser("classifier", help="train a fastText-style document classifier for prepare's quality "
                                                 "and toxicity steps (see llm_jax/data/prepare/classifier_stage.py)")
    sub.add_argument("--config", required=True, help="path/to/classifier.py[:arg]")
    sub.add_argument("--workdir", required=True, help="where classifier.npz, classifier.json and report.md go")
    sub = commands.add_parser("pipeline", help="every stage of a pipeline config, each in <workdir>/<stage>, "
                                               "skipping complete ones; prints a table (see llm_jax/pipeline.py)")
    sub.add_argument("--config", required=True, help="path/to/pipeline.py[:arg]")
    sub.add_argument("--workdir", required=True, help="the pipeline directory")
    sub = commands.add_parser("sweep", help="train a scaling sweep's unfinished runs and write their results CSV "
                                            "(see llm_jax/scaling/sweep.py)")
    sub.add_argument("--config", required=True, help="path/to/sweep.py[:arg]")
    sub.add_argument("--workdir", required=True, help="the sweep directory (one subdirectory per run)")
    sub.add_argument("--processes", type=int, help="train this many runs at once, each in its own process "
                                                   "(default: the config's processes)")
    sub.add_argument("--dry-run", action="store_true", help="print the runs (steps, tokens, FLOPs) and stop")
    sub = commands.add_parser("generate", help="answer every prompt of a file with a run's model; one jsonl row "
                                               "per prompt (see llm_jax/generation_io.py)")
    sub.add_argument("--run", required=True, help="the run directory (config.json, tokenizer.model, checkpoints)")
    sub.add_argument("--prompts", required=True, help="prompts file(s): jsonl, jsonl.gz or parquet; a glob or a "
                                                      "comma list")
    sub.add_argument("--out", help="output jsonl (default <run>/generations/<prompts name>.jsonl)")
    _sampling_arguments(sub, max_new_tokens=64, temperature=0.0)
    sub.add_argument("--no-cache", action="store_true",
                     help="re-run the full forward every step instead of the KV cache (slow; a reference)")
    sub.add_argument("--no-chat-template", action="store_true",
                     help="feed each prompt's text as it is, tokenized as the checkpoint's tokenizer does (a BOS "
                          "where it adds one), and stop at its end-of-sequence ids")
    sub.add_argument("--judge", default="gold", help=f"what scores the answers: {_JUDGES} (default gold: the "
                                                     "records with a 'task' key); 'none' for no scores")
    sub = commands.add_parser("import-hf", help="a local Hugging Face checkpoint as a run directory (see "
                                                "llm_jax/hf/import_hf.py); --config.* overrides apply to its config")
    sub.add_argument("--hf", required=True, help="the checkpoint directory (config.json, *.safetensors, tokenizer)")
    sub.add_argument("--workdir", required=True, help="the run directory to write")
    sub = commands.add_parser("export-hf", help="write a run as a Hugging Face checkpoint (see llm_jax/hf/export_hf.py)")
    sub.add_argument("--run", required=True, help="the run directory (imported or trained here)")
    sub.add_argument("--out", required=True, help="the output directory (refused if not empty, unless --overwrite)")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sub.add_argument("--dtype", help="tensor dtype of the export (default: the run's model.param_dtype)")
    sub.add_argument("--step", type=int, help="checkpoint step of --run (default: the latest)")
    sub.add_argument("--max-shard-gb", type=float, default=1.0,
                     help="safetensors shard size limit (a shard is held on the host before it is written)")
    sub = commands.add_parser("rejection-sample", help="sample K answers per prompt, keep the reward model's best "
                                                       "as SFT records (see llm_jax/rl/rejection_sampling.py)")
    _best_of_k_arguments(sub, "SFT records")
    sub.add_argument("--reward-run", required=True, help=f"the judge that picks the best: {_JUDGES}")
    sub.add_argument("--threshold", type=float, help="keep a prompt's best answer only if its reward is ≥ this")
    sub = commands.add_parser("preference-pairs", help="sample K answers per prompt, write a judge's best against "
                                                       "its worst as preference records (see "
                                                       "llm_jax/rl/preference_pairs.py)")
    _best_of_k_arguments(sub, "preference records")
    sub.add_argument("--judge", required=True, help=_JUDGES)
    sub.add_argument("--pairs", default="best-worst", choices=("best-worst", "all", "ranking"),
                     help="best-worst: one pair per prompt; all: every two answers whose scores differ; ranking: "
                          "one record of the prompt's answers ranked by score (ties kept)")
    sub.add_argument("--min-margin", type=float, help="least score difference of a pair (default 0.2 for gold, "
                                                      "0 for a reward model; equal scores never pair)")
    _scaling_fit_arguments(commands)
    _eval_arguments(commands)
    return parser


def _eval_arguments(commands) -> None:
    sub = commands.add_parser("eval", help="evaluate runs: lm-evaluation-harness tasks on one run (--run), or an "
                                           "evaluation config (--config: arena, win rate, generative tasks, "
                                           "perplexity, in-context learning; see llm_jax/eval/)")
    sub.add_argument("--run", help="the run directory to evaluate on lm-eval tasks")
    sub.add_argument("--lm-eval-tasks", help="comma-separated lm-eval task names (or globs such as mmlu_*)")
    sub.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                     help="a directory of task YAMLs of your own (lm-eval's --include_path; repeatable)")
    sub.add_argument("--num-fewshot", type=int, help="demonstrations in each prompt (default: the task's)")
    sub.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    sub.add_argument("--log-samples", action="store_true", help="also write lm-eval's per-sample files")
    sub.add_argument("--out", help="where lm-eval's results JSON (and samples) go")
    sub.add_argument("--apply-chat-template", action="store_true",
                     help="render each prompt with the run's chat template (chat models)")
    sub.add_argument("--batch-size", type=int, default=16, help="rows of every scoring and generation batch")
    sub.add_argument("--step", type=int, help="checkpoint step of --run (default: the latest)")
    sub.add_argument("--seed", type=int, default=0, help="seed of sampled generations")
    sub.add_argument("--mesh", help="shard the model and batches over a mesh, e.g. data=-1 or fsdp=4,data=2 "
                                    "(default: one device)")
    sub.add_argument("--offline", action="store_true",
                     help="use only cached datasets and local task files (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE)")
    sub.add_argument("--config", help="path/to/eval.py[:arg], e.g. configs/eval.py:arena")
    sub.add_argument("--workdir", help="the evaluation directory of --config (answers, tables, summary.json)")


_JUDGES = ("a reward model's run directory, gold (the embedded task's program, on prompts with a 'task' key), "
           "exact_match, regex_match, numeric_match (against each record's 'reference') or module:function "
           "(llm_jax/eval/judges.py)")


def _scaling_fit_arguments(commands) -> None:
    sub = commands.add_parser("scaling-fit", help="fit a scaling law to a CSV of runs; JSON coefficients with "
                                                  "bootstrap intervals, and plots (see llm_jax/scaling/fit.py)")
    sub.add_argument("results", help="CSV with a header row and one row per run")
    sub.add_argument("--approach", default="3", choices=("kaplan", "1", "2", "3"),
                     help="kaplan: L(N), L(D), L(C), L(N, D); Chinchilla 1: frontier, 2: IsoFLOP parabolas, "
                          "3: L = E + A/N^alpha + B/D^beta (default)")
    sub.add_argument("--n-col", default="N", help="parameter column (N: Kaplan's non-embedding; N_total)")
    sub.add_argument("--d-col", default="D", help="training-token column")
    sub.add_argument("--loss-col", default="loss", help="loss column (loss, best_loss)")
    sub.add_argument("--flops-col", help="compute column (default: flops when present, else 6·N·D)")
    sub.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals (0: none)")
    sub.add_argument("--confidence", type=float, default=0.95, help="interval coverage")
    sub.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    sub.add_argument("--holdout-fraction", type=float, default=0.2,
                     help="extrapolation check (3, kaplan): refit without the runs in this top fraction of "
                          "compute and predict them (0: skip)")
    sub.add_argument("--outlier-z", type=float,
                     help="Approach 3: drop runs whose log residual is over this many robust deviations, refit")
    sub.add_argument("--fixed-E", type=float, dest="fixed_E",
                     help="Approach 3: hold E at this known irreducible loss (e.g. a corpus's entropy floor) and fit "
                          "A, B, alpha, beta")
    sub.add_argument("--isoflop-tolerance", type=float, default=0.1,
                     help="Approach 2: runs whose compute agrees within this fraction form one budget")
    sub.add_argument("--isoflop-window", type=int, default=0,
                     help="Approach 2: fit each budget's parabola to this many sizes around its lowest loss "
                          "(0: all; a lopsided range of sizes biases the vertex)")
    sub.add_argument("--compute", type=float, action="append", default=[],
                     help="Approach 3: report N_opt, D_opt and the loss at this budget (repeatable; default: "
                          "the largest run's compute)")
    sub.add_argument("--predict", action="append", default=[], metavar="N,D",
                     help="Approach 3: report the loss at N,D with its interval (repeatable)")
    sub.add_argument("--plots-dir", help="where the PNGs go (default: <results name>_plots beside the CSV)")
    sub.add_argument("--no-plots", action="store_true", help="print the JSON only (no matplotlib needed)")


def _best_of_k_arguments(sub, records: str) -> None:
    """What the commands that sample K answers per prompt from a policy run share."""
    sub.add_argument("--run", required=True, help="the policy run directory (the model that samples)")
    sub.add_argument("--prompts", required=True, help="prompts file(s) as for generate, or default_task (the "
                                                      "embedded task's train prompts)")
    sub.add_argument("--k", type=int, default=8, help="samples per prompt")
    sub.add_argument("--out", required=True, help=f"output jsonl of {records}")
    _sampling_arguments(sub, max_new_tokens=32, temperature=1.0)


def _sampling_arguments(sub, *, max_new_tokens: int, temperature: float) -> None:
    sub.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sub.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    sub.add_argument("--top-k", type=int, default=0, help="0: off")
    sub.add_argument("--top-p", type=float, default=1.0, help="1: off")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--batch-size", type=int, default=32)
    sub.add_argument("--step", type=int, help="checkpoint step of --run (default: the latest)")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) from the other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise config_lib.ConfigError(f"override {arg} has no value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _sample_command(args, overrides: list[str], run, check=None) -> int:
    """Runs `run(sampling)` for a sampling command; usage errors exit 2, bad runs or data 1."""
    from llm_jax.data.sources import DataError
    from llm_jax.generate import SamplingConfig
    from llm_jax.train.checkpoint import CheckpointError

    if overrides:
        raise config_lib.ConfigError(f"{args.command} reads the run's own config; it takes no overrides "
                                     f"(got --config.{overrides[0]})")
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p)
        if check is not None:
            check()
    except ValueError as e:
        print(f"llm-jax {args.command}: {e}", file=sys.stderr)
        return 2
    try:
        result = run(sampling)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"llm-jax {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0


def _generate(args, overrides: list[str]) -> int:
    from llm_jax.eval.judges import load_judge
    from llm_jax.generation_io import generate_file
    return _sample_command(args, overrides, lambda sampling: generate_file(
        args.run, args.prompts, args.out, sampling, batch_size=args.batch_size, seed=args.seed, step=args.step,
        use_cache=not args.no_cache, chat_template=not args.no_chat_template,
        judge=None if args.judge == "none" else load_judge(args.judge, batch_size=args.batch_size)))


def _rejection_sample(args, overrides: list[str]) -> int:
    from llm_jax.rl import rejection_sampling as rs
    return _sample_command(args, overrides, lambda sampling: rs.rejection_sample(
        args.run, args.reward_run, args.prompts, args.out, args.k, sampling, threshold=args.threshold,
        batch_size=args.batch_size, seed=args.seed, step=args.step),
        check=lambda: rs.check_options(args.k, args.threshold, args.batch_size))


def _preference_pairs(args, overrides: list[str]) -> int:
    from llm_jax.rl import preference_pairs as pp
    return _sample_command(args, overrides, lambda sampling: pp.preference_pairs(
        args.run, args.judge, args.prompts, args.out, args.k, sampling, pairing=args.pairs,
        min_margin=args.min_margin, batch_size=args.batch_size, seed=args.seed, step=args.step),
        check=lambda: pp.check_options(args.k, args.min_margin, args.pairs, args.batch_size))


def _memory(config, args, overrides: list[str]) -> int:
    """The per-device memory of the config's train step; a bad config, or an objective with its own loop, exits 2
    (checked as `train` checks it, before anything is built)."""
    from llm_jax.objectives import get_objective, own_loop
    from llm_jax.train.loop import memory_before_launch, validate
    try:
        validate(config)
        objective = get_objective(config.objective)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    if own_loop(objective) is not None:
        raise config_lib.ConfigError(f"objective {config.objective!r} runs its own loop; llm-jax memory measures the "
                                     "train step of the LM-style objectives: lm, sft, reward, dpo")
    report = memory_before_launch(config, objective)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(" ".join([args.config, *(f"--config.{o}" for o in overrides)]))
        print(report.table(), end="")
    return 0


def _pipeline(config, workdir: str) -> int:
    from llm_jax.pipeline import PipelineError, run_pipeline
    try:
        summary = run_pipeline(config, workdir)
    except PipelineError as e:
        print(f"llm-jax pipeline: {e}", file=sys.stderr)
        return 1
    print(summary["table"], end="")
    return 0


def _data_command(name: str, run, config, workdir: str) -> int:
    """`prepare` and `classifier`: a bad config exits 2; input data that stops the command 1 (for prepare, the
    shards already complete stay)."""
    from llm_jax.data.sources import DataError
    try:
        summary = run(config, workdir)
    except config_lib.ConfigError as e:
        print(f"llm-jax {name}: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"llm-jax {name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def _sweep(config, args) -> int:
    """A bad sweep config exits 2; failed runs 1 (after the finished ones are in the results table)."""
    from llm_jax.scaling.sweep import SweepError, run_sweep
    try:
        summary = run_sweep(config, args.workdir, processes=args.processes, dry_run=args.dry_run)
    except (SweepError, FileNotFoundError) as e:
        print(f"llm-jax sweep: {e}", file=sys.stderr)
        return 2
    print(summary["table"], end="")
    if args.dry_run:
        return 0
    print(f"results: {summary['results']} ({len(summary['rows'])} runs)")
    for name, error in summary["failed"].items():
        print(f"llm-jax sweep: run {name} failed: {error}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _scaling_fit(args, overrides: list[str]) -> int:
    """Usage errors exit 2; data the fit cannot use, or a missing matplotlib, 1."""
    from llm_jax.scaling.report import default_plots_dir, parse_point, scaling_fit
    from llm_jax.scaling.results import FitError

    if overrides:
        raise config_lib.ConfigError(f"scaling-fit takes no config overrides (got --config.{overrides[0]})")
    try:
        predict = [parse_point(text) for text in args.predict]
    except FitError as e:
        print(f"llm-jax scaling-fit: {e}", file=sys.stderr)
        return 2
    plots_dir = None if args.no_plots else (args.plots_dir or default_plots_dir(args.results))
    try:
        result = scaling_fit(args.results, approach=args.approach, n_col=args.n_col, d_col=args.d_col,
                             loss_col=args.loss_col, flops_col=args.flops_col, bootstrap=args.bootstrap,
                             confidence=args.confidence, seed=args.seed, holdout_fraction=args.holdout_fraction,
                             outlier_z=args.outlier_z, fixed_E=args.fixed_E,
                             isoflop_tolerance=args.isoflop_tolerance, isoflop_window=args.isoflop_window,
                             compute=args.compute, predict=predict, plots_dir=plots_dir)
    except (FitError, ImportError) as e:
        print(f"llm-jax scaling-fit: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


def _parse_mesh(text: str | None):
    """`data=-1,fsdp=2` as a mesh over this host's devices (unnamed axes 1; without a -1, over the first
    devices that many), or None."""
    if not text:
        return None
    import ml_collections

    from llm_jax import sharding
    sizes = dict(data=1, fsdp=1, tensor=1, sequence=1)
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in sizes:
            raise config_lib.ConfigError(f"--mesh {text!r}: expected axis=size pairs over {list(sizes)}")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise config_lib.ConfigError(f"--mesh {text!r}: size {value!r} of {name} is not an integer") from None
    import math

    import jax
    devices = jax.devices()
    if -1 not in sizes.values():  # a mesh smaller than the host: its first devices
        devices = devices[:math.prod(sizes.values())]
    return sharding.make_mesh(ml_collections.ConfigDict(sizes), devices)


def _eval(args, overrides: list[str]) -> int:
    """lm-eval tasks on one run, or an evaluation config; misuse of the flags exits 2."""
    if args.config:
        if args.run or args.lm_eval_tasks or not args.workdir:
            raise config_lib.ConfigError("eval --config takes --workdir (and --config.* overrides), not --run or "
                                         "--lm-eval-tasks")
        from llm_jax.eval.configured import run_eval_config
        summary = run_eval_config(config_lib.load(args.config, overrides), args.workdir)
        print(summary["table"], end="")
        return 0
    if overrides:
        raise config_lib.ConfigError(f"eval --run takes no config overrides (got --config.{overrides[0]})")
    if not args.run or not args.lm_eval_tasks:
        raise config_lib.ConfigError("eval needs --run and --lm-eval-tasks (lm-eval), or --config and --workdir")
    from llm_jax.eval.harness import run_lm_eval
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = run_lm_eval(args.run, args.lm_eval_tasks, include_path=args.lm_eval_include or None,
                          num_fewshot=args.num_fewshot, limit=limit, log_samples=args.log_samples,
                          out_dir=args.out, batch_size=args.batch_size, step=args.step,
                          apply_chat_template=args.apply_chat_template, mesh=_parse_mesh(args.mesh), seed=args.seed,
                          offline=args.offline)
    from lm_eval.utils import make_table
    print(make_table(results), end="")
    output = results.get("config", {}).get("llm_jax", {}).get("output")
    if output:
        print(f"results: {output}")
    return 0


def _hf_command(args, overrides: list[str]) -> int:
    """import-hf and export-hf: a checkpoint, run or tokenizer they cannot use exits 1 with one line."""
    from llm_jax.data.sources import DataError
    from llm_jax.train.checkpoint import CheckpointError
    try:
        if args.command == "import-hf":
            from llm_jax.hf.import_hf import import_hf
            result = import_hf(args.hf, args.workdir, overrides)
        else:
            if overrides:
                raise config_lib.ConfigError(f"export-hf reads the run's own config; it takes no overrides "
                                             f"(got --config.{overrides[0]})")
            from llm_jax.hf.export_hf import export_hf
            result = export_hf(args.run, args.out, overwrite=args.overwrite, dtype=args.dtype, step=args.step,
                               max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except config_lib.ConfigError as e:
        print(f"llm-jax {args.command}: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"llm-jax {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0


_SAMPLING_COMMANDS = {"generate": _generate, "rejection-sample": _rejection_sample,
                      "preference-pairs": _preference_pairs}


# Errors in what the user asked for (the config, its overrides, the mesh it names): exit 2. Everything else that
# stops a command (bad data, a damaged or missing checkpoint, a diverged run, a full disk) exits 1.
def _config_errors() -> tuple:
    from llm_jax.sharding import ShardingError
    return (config_lib.ConfigError, ShardingError)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; every error is one line on stderr naming the thing and the value (exit 2 for the config,
    1 otherwise), its traceback only with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"llm-jax {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every command's errors become one line
        if debug:
            raise
        print(f"llm-jax {command}: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, _config_errors()) else 1


def _one_line(error: BaseException) -> str:
    """The error's message on one line; a type the project does not raise itself (a bug, most likely) is named,
    with the way to see its traceback."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    if type(error).__module__.startswith("llm_jax") or isinstance(error, (ValueError, OSError, RuntimeError)):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"


def _main(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command in _SAMPLING_COMMANDS:
        return _SAMPLING_COMMANDS[args.command](args, overrides)
    if args.command == "scaling-fit":
        return _scaling_fit(args, overrides)
    if args.command == "eval":
        return _eval(args, overrides)
    if args.command in ("import-hf", "export-hf"):
        return _hf_command(args, overrides)
    config = config_lib.load(args.config, overrides)
    if args.command == "memory":
        return _memory(config, args, overrides)
    if args.command == "pipeline":
        return _pipeline(config, args.workdir)
    if args.command == "sweep":
        return _sweep(config, args)
    if args.command == "classifier":
        from llm_jax.data.prepare.classifier_stage import run_classifier
        return _data_command("classifier", run_classifier, config, args.workdir)
    if args.distributed:
        import jax
        # CPU hosts exchange collectives over gloo; accelerators keep their own (ICI, NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Before any other JAX call: every process then sees the global device set and mesh.
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.command == "prepare":
        from llm_jax.data.prepare.prepare_stage import run_prepare
        return _data_command("prepare", run_prepare, config, args.workdir)
    if args.command == "tokenizer":
        from llm_jax.data.tokenizer_stage import run_tokenizer
        result = run_tokenizer(config, args.workdir)
    else:
        from llm_jax.eval.during_training import training_evals
        from llm_jax.train.loop import validate
        from llm_jax.training import run
        try:  # the config alone, before any data, tokenizer or compilation: a bad value exits 2
            validate(config)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from e
        result = run(config, args.workdir, generative_evals=training_evals(config))
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
