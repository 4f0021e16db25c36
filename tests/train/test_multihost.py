"""Two CPU processes joined by `llm-jax train --distributed` (gloo collectives) train like one process."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from llm_jax.train.metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, tokenizer, overrides):
    return [sys.executable, "-m", "llm_jax.cli", "train", "--config", "configs/pretrain.py:tiny",
            "--workdir", str(workdir), f"--config.tokenizer.path={tokenizer}"] + [f"--config.{o}" for o in overrides]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def _values(workdir, key):
    return [m[key] for m in read_metrics(workdir) if key in m]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_devices(small_tokenizer, small_overrides, tmp_path):
    port = _free_port()
    hosts = [subprocess.Popen(_command(tmp_path / "multi", small_tokenizer, small_overrides)
                              + ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                 "--process-id", str(i)],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [host.communicate(timeout=600) for host in hosts]
    for host, (_, err) in zip(hosts, outputs):
        assert host.returncode == 0, err[-3000:]
    assert outputs[0][0].splitlines()[-1] == outputs[1][0].splitlines()[-1]  # both hosts report the same run
    subprocess.run(_command(tmp_path / "single", small_tokenizer, small_overrides), env=_env(4), check=True,
                   capture_output=True)
    # Each host feeds its own rows; the global batches hold the same rows, so only summation order differs.
    for key in ("loss", "grad_norm", "eval_loss"):
        np.testing.assert_allclose(_values(tmp_path / "multi", key), _values(tmp_path / "single", key), rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["4", "8"]
