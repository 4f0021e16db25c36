"""experiments/benchmarks/rl_iteration.py runs the real RL loop and reports every role's figures: one timed
iteration on the conftest's untrained runs (the plumbing, not the speed: timings belong to the script itself)."""
import importlib.util
import json
import math
import os

import jax

from llm_jax import sharding
from llm_jax.data import default_task

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "benchmarks", "rl_iteration.py")
_spec = importlib.util.spec_from_file_location("rl_iteration", _PATH)
rl_iteration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rl_iteration)


def test_one_iteration_reports_seconds_flops_and_mfu_per_role(tiny_rl_runs, tmp_path, capsys, monkeypatch):
    # One device, as the script runs: compiling for the eight emulated ones would double the test's time.
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda mesh_config, devices=None: make_mesh(mesh_config,
                                                                                           jax.devices()[:1]))
    policy, rm = tiny_rl_runs
    prompts = {}
    for split, n in (("train", 16), ("eval", 8)):
        prompts[split] = tmp_path / f"prompts_{split}.jsonl"
        prompts[split].write_text("".join(json.dumps(r) + "\n" for r in default_task.iter_records(f"prompts_{split}",
                                                                                                   n)))
    # The untrained reward run logged no eval statistics to standardise with. `default` allocator: the test
    # process's malloc stays as it is.
    result = rl_iteration.main([
        "--policy", policy, "--reward", rm, "--iterations", "1", "--warmup", "1", "--host_allocator", "default",
        "--matmul_n", "128", f"--config.rl.prompts={prompts['train']}",
        f"--config.rl.eval_prompts={prompts['eval']}", "--config.rl.n_eval_prompts=8",
        "--config.rl.rollout_batch=8", "--config.rl.minibatch=4", "--config.rl.epochs=1",
        "--config.rl.max_new_tokens=6", "--config.rl.normalize_score=False", "--config.data.seq_len=48"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["roles"]) == {"generate", "reward", "score", "train"}
    for figures in result["roles"].values():
        for name in ("seconds", "flops", "tflops_per_s", "mfu", "compile_iteration_seconds"):
            assert math.isfinite(figures[name]) and figures[name] > 0, (name, figures)
    for name in ("iteration_s", "responses_per_s", "compile_s", "matmul_tflops_per_s", "n_params"):
        assert math.isfinite(result[name]) and result[name] > 0, (name, result[name])
    assert result["rollout_batch"] == 8 and result["mfu_against"] == "measured matmul"
    assert result["n_layers"] == 2 and result["vocab_size"] == 512  # the shape comes from the policy run
