"""Make tests/eval/hf_reference.json: what lm-eval's own Hugging Face backend (`--model hf`) answers on the local
test tasks for an `export-hf` of the imported llama fixture, so CI (no torch) can compare the llm_jax adapter with it.

Why: llm_jax/eval/harness.py claims that an llm_jax run evaluated through it gives the numbers lm-eval's HF
backend gives for the same weights exported to transformers: the same requests, the same log-likelihoods, the
same greedy generations. CI cannot run torch, so the HF side is computed once here and committed.

How: in an environment with torch, transformers, accelerate, lm_eval and jax (here /work/venv-ref; llm_jax is
imported from this checkout):

    /work/venv-ref/bin/python tests/eval/make_hf_reference.py [--out tests/eval/hf_reference.json]

It imports tests/hf/fixtures/llama into a run (`import_hf`), exports that run (`export_hf`), and runs
`lm_eval.simple_evaluate(model="hf", model_args="pretrained=<export>,dtype=float32,max_length=<run context>",
tasks=TASKS)` on CPU with batch size 1 (no padding), every other setting lm-eval's default, the tasks from
tests/eval/tasks (their data is read by tests/eval/tasks/llm_jax_task_data.py, offline). The JSON keeps, per task,
lm-eval's metrics and per document the request arguments and the raw responses (log-likelihood and is-greedy
per choice, the rolling log-likelihood, the generated text), and the library versions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TASKS_DIR = os.path.join(HERE, "tasks")
FIXTURE = os.path.join(ROOT, "tests", "hf", "fixtures", "llama")
TASKS = ["llm_jax_mc", "llm_jax_rolling", "llm_jax_gen"]
REFERENCE = os.path.join(HERE, "hf_reference.json")


def import_and_export(workdir: str) -> tuple[str, str]:
    """(the imported fixture run, its export-hf directory) under workdir."""
    from llm_jax.hf.export_hf import export_hf
    from llm_jax.hf.import_hf import import_hf
    run_dir, export_dir = os.path.join(workdir, "run"), os.path.join(workdir, "export")
    import_hf(FIXTURE, run_dir)
    export_hf(run_dir, export_dir)
    return run_dir, export_dir


def per_document(samples: dict) -> dict:
    """{task: [{doc_id, arguments, resps}]} from simple_evaluate's samples: one raw response per request."""
    out = {}
    for task, docs in samples.items():
        rows = []
        for s in sorted(docs, key=lambda s: s["doc_id"]):
            rows.append({"doc_id": s["doc_id"],
                         "arguments": [list(a) for a in s["arguments"]],
                         "resps": [json.loads(json.dumps(r[0], default=str)) for r in s["resps"]]})
        out[task] = rows
    return out


def metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if "," in k and "stderr" not in k}
            for task, values in results["results"].items()}


def hf_reference(export_dir: str, max_length: int) -> dict:
    """lm-eval's HF backend on the export: metrics and per-document responses (module docstring)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export_dir},dtype=float32,max_length={max_length}",
        tasks=list(TASKS), task_manager=TaskManager(include_path=TASKS_DIR), batch_size=1, device="cpu",
        log_samples=True)
    return {"metrics": metrics(results), "documents": per_document(results["samples"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=REFERENCE)
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import lm_eval
    import torch
    import transformers

    from llm_jax.train.run_record import read_run_config

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        run_dir, export_dir = import_and_export(workdir)
        max_length = int(read_run_config(run_dir).data.seq_len)
        reference = hf_reference(export_dir, max_length)
    reference = {
        "about": {"fixture": "tests/hf/fixtures/llama", "tasks": TASKS, "max_length": max_length,
                  "model_args": "pretrained=<export>,dtype=float32,max_length=%d" % max_length, "batch_size": 1,
                  "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__,
                               "transformers": transformers.__version__}},
        **reference}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}: " + json.dumps(reference["metrics"]))


if __name__ == "__main__":
    main()
