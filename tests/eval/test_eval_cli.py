"""`llm-jax eval --run ... --lm-eval-tasks ...`: the interface flags end to end on local task YAMLs, lm-eval's own
files in --out, and one line for each misuse."""
import glob
import json
import os

import pytest

pytest.importorskip("lm_eval")

from llm_jax import cli  # noqa: E402  (after the skip)

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(HERE, "tasks")
LLAMA = os.path.join(os.path.dirname(HERE), "hf", "fixtures", "llama")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from llm_jax.hf.import_hf import import_hf
    run_dir = str(tmp_path_factory.mktemp("llama") / "run")
    import_hf(LLAMA, run_dir)
    return run_dir


def test_eval_writes_lm_evals_results_and_samples(llama_run, tmp_path, capsys):
    out = tmp_path / "evals"
    code = cli.main(["eval", "--run", llama_run, "--lm-eval-tasks", "llm_jax_mc,llm_jax_gen", "--lm-eval-include",
                     TASKS_DIR, "--num-fewshot", "2", "--limit", "3", "--log-samples", "--out", str(out),
                     "--batch-size", "4", "--mesh", "data=2", "--offline"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "llm_jax_mc" in printed and "llm_jax_gen" in printed and "results: " in printed
    results_files = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert len(results_files) == 1
    results = json.load(open(results_files[0]))
    assert set(results["results"]) == {"llm_jax_mc", "llm_jax_gen"}
    assert results["n-shot"] == {"llm_jax_mc": 2, "llm_jax_gen": 2}
    assert "acc,none" in results["results"]["llm_jax_mc"] and "exact_match,none" in results["results"]["llm_jax_gen"]
    for task in ("llm_jax_mc", "llm_jax_gen"):
        samples, = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        assert len(open(samples).read().splitlines()) == 3  # --limit 3


@pytest.mark.parametrize("args, message", [
    (["--lm-eval-tasks", "no_such_task_xyz"], "no_such_task_xyz"),
    (["--lm-eval-tasks", "llm_jax_mc", "--num-fewshot", "1000"], "llm_jax_mc"),
    ([], "eval needs --run and --lm-eval-tasks"),
    (["--lm-eval-tasks", "llm_jax_mc", "--mesh", "data=x"], "--mesh 'data=x'"),
])
def test_misuse_is_one_line(llama_run, capsys, args, message):
    code = cli.main(["eval", "--run", llama_run, "--lm-eval-include", TASKS_DIR, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("llm-jax eval: ") and message in err[0]
