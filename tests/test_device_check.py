"""experiments/benchmarks/device_check.sh: on a machine without GPU or TPU it says so and leaves at once; its
bookkeeping (one JSON per measurement, summary.json) holds even when no step gets any time."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks", "device_check.sh")
MEASUREMENTS = ["machine", "tests", "attention", "train_125m", "train_1b", "generation"]


def _accelerator_visible() -> bool:
    if glob.glob("/dev/accel*"):
        return True
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def _run(out_dir, extra_env=None, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable, **(extra_env or {}))
    return subprocess.run(["bash", SCRIPT, str(out_dir)], capture_output=True, text=True, env=env, timeout=timeout)


def test_the_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_without_a_directory_it_prints_its_usage():
    result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.skipif(_accelerator_visible(), reason="this machine has a GPU or TPU: the script would measure it")
def test_on_cpu_it_exits_at_once_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "figures"
    start = time.perf_counter()
    result = _run(out_dir)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout == "device_check: no GPU or TPU here (jax backend: cpu); nothing to measure\n"
    assert not out_dir.exists()
    assert seconds < 60  # one `import jax`; nothing installed, compiled or measured


def test_every_measurement_gets_a_json_even_with_no_time_left(tmp_path):
    # a stand-in nvidia-smi makes the script take the accelerator path; with a budget of 0 every step is skipped,
    # so nothing is installed or run, and what is left is the bookkeeping
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out_dir = tmp_path / "figures"
    result = _run(out_dir, dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DEVICE_CHECK_BUDGET_S="0",
                                DEVICE_CHECK_INSTALL="0"))
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["ok"] is False and summary["accelerator"] == "gpu"
    assert [s["name"] for s in summary["steps"]] == ["install"] + MEASUREMENTS
    assert {s["status"] for s in summary["steps"]} == {"skipped"}
    for name in MEASUREMENTS:
        record = json.loads((out_dir / f"{name}.json").read_text())
        assert record["status"] == "skipped" and record["error"] == "no time left in the budget", name
    assert json.loads(result.stdout[result.stdout.index("{"):]) == summary
