"""Bad inputs and faults through `llm-jax train`, as a user meets them: each is one line on stderr naming the thing
and its value, the documented exit code (2 a bad config, 1 bad data or a failed run), no traceback, and nothing
already written changed. Damaged checkpoints fall back to the newest intact one, and the run then ends exactly where
an uninterrupted run does."""
import errno
import gzip
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from run_fixtures import SMALL_OVERRIDES

from llm_jax import cli
from llm_jax.train import manifest
from llm_jax.train.checkpoint import checkpoint_dir
from llm_jax.train.run_record import read_history

pytestmark = pytest.mark.slow


def _args(workdir, overrides, *extra, command="train", config="configs/pretrain.py:tiny"):
    return [command, "--config", config, "--workdir", str(workdir), *[f"--config.{o}" for o in overrides],
            *[f"--config.{o}" for o in extra]]


@pytest.fixture(scope="module")
def base(small_tokenizer, tmp_path_factory):
    """(a finished 8-step run with checkpoints 4 and 8, its overrides): the run every case copies."""
    overrides = SMALL_OVERRIDES + [f"tokenizer.path={small_tokenizer}"]
    workdir = tmp_path_factory.mktemp("trust") / "base"
    assert cli.main(_args(workdir, overrides)) == 0
    return workdir, overrides


def _copy(base_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(base_dir, target)
    return target


def _snapshot(root) -> dict:
    """sha256 of every file under `root`, by relative path."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _params(workdir, step):
    manager = ocp.CheckpointManager(checkpoint_dir(str(workdir)))
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    manager.close()
    return restored["params"]


def _largest_file(folder):
    files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(files, key=os.path.getsize)


def _flip(path, n=4096):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        block = f.read(min(n, size - size // 2))
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))


def _one_line_error(err: str, code: int, expected_code: int, *needles):
    assert code == expected_code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llm-jax train: "), err
    for needle in needles:
        assert needle in last, (needle, last)


# ---------------------------------------------------------------------------------------------- damaged checkpoints

def _flip_params(run):
    _flip(_largest_file(run / "checkpoints" / "8" / "params"))
    return "params/"


def _truncate(run):
    path = _largest_file(run / "checkpoints" / "8" / "train_state")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "bytes,"


def _delete_train_state(run):
    shutil.rmtree(run / "checkpoints" / "8" / "train_state")
    return "train_state/"


def _garble_data_iterator(run):
    files = [os.path.join(d, n) for d, _, names in os.walk(run / "checkpoints" / "8" / "data") for n in names]
    assert files, "the checkpoint saves the data iterator"
    with open(files[0], "r+b") as f:
        f.write(b"}{garbled")
    return "data/"


def _no_manifest(run):  # the process died between the commit and the manifest
    os.remove(run / "checkpoints" / "8" / manifest.NAME)
    return manifest.NAME


@pytest.mark.parametrize("damage", [_flip_params, _truncate, _delete_train_state, _garble_data_iterator,
                                    _no_manifest], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_latest_checkpoint_falls_back_and_ends_as_an_uninterrupted_run(base, tmp_path, capsys, damage):
    base_dir, overrides = base
    run = _copy(base_dir, tmp_path)
    needle = damage(run)
    before = _snapshot(run / "checkpoints" / "4")
    assert cli.main(_args(run, overrides)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warning = next(line for line in err.splitlines() if line.startswith("warning: checkpoint"))
    assert f"{run}/checkpoints/8" in warning and needle in warning, warning
    assert "resumed" in err and "from step 4" in err
    assert _snapshot(run / "checkpoints" / "4") == before  # the good one was only read
    assert (run / "checkpoints_damaged" / "8").is_dir()  # kept for inspection, out of the way
    jax.tree.map(np.testing.assert_array_equal, _params(run, 8), _params(base_dir, 8))
    assert [e["event"] for e in read_history(run)] == ["start", "resume"]


def test_non_finite_params_with_a_valid_manifest_fall_back(base, tmp_path, capsys):
    base_dir, overrides = base
    run = _copy(base_dir, tmp_path)
    step_dir = run / "checkpoints" / "8"
    params = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), _params(run, 8))
    shutil.rmtree(step_dir / "params")
    writer = ocp.StandardCheckpointer()
    writer.save(step_dir / "params", params)
    writer.wait_until_finished()
    writer.close()
    manifest.write(str(step_dir), 8)  # a manifest that matches: the values themselves are the damage
    assert cli.main(_args(run, overrides)) == 0
    err = capsys.readouterr().err
    assert "non-finite values in" in err and "from step 4" in err
    jax.tree.map(np.testing.assert_array_equal, _params(run, 8), _params(base_dir, 8))


def test_no_intact_checkpoint_is_one_line(base, tmp_path, capsys):
    base_dir, overrides = base
    run = _copy(base_dir, tmp_path)
    for step in ("4", "8"):
        _flip(_largest_file(run / "checkpoints" / step / "params"))
    code = cli.main(_args(run, overrides))
    _one_line_error(capsys.readouterr().err, code, 1, "no checkpoint in", "is intact")


def test_starting_from_a_run_whose_checkpoints_are_damaged_names_the_file(base, tmp_path, capsys):
    base_dir, overrides = base
    parent = _copy(base_dir, tmp_path)
    for step in ("4", "8"):
        _flip(_largest_file(parent / "checkpoints" / step / "params"))
    before = _snapshot(parent)
    code = cli.main(_args(tmp_path / "child", overrides, f"train.init_from={parent}", "tokenizer.path="))
    _one_line_error(capsys.readouterr().err, code, 1, "no checkpoint of run", str(parent))
    assert _snapshot(parent) == before  # another run is never modified


def test_generate_skips_a_damaged_latest_checkpoint_and_refuses_a_damaged_chosen_one(base, tmp_path, capsys):
    base_dir, _ = base
    run = _copy(base_dir, tmp_path)
    _flip(_largest_file(run / "checkpoints" / "8" / "params"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    args = ["generate", "--run", str(run), "--prompts", str(prompts), "--max-new-tokens", "2", "--batch-size", "8"]
    assert cli.main(args + ["--out", str(tmp_path / "a.jsonl")]) == 0
    assert "params/" in capsys.readouterr().err
    code = cli.main(args + ["--out", str(tmp_path / "b.jsonl"), "--step", "8"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "does not match its sha256" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- resumes

@pytest.mark.parametrize("change, named", [
    ("seed=7", "seed: 0 in the run, 7 now"),
    ("data.eval_fraction=0.2", "data.eval_fraction"),
    ("optim.lr=5e-4", "optim.lr"),
    ("train.steps=12", "train.steps: 8 in the run, 12 now"),
])
def test_a_resume_that_would_change_the_run_is_refused_naming_every_field(base, tmp_path, capsys, change, named):
    base_dir, overrides = base
    run = _copy(base_dir, tmp_path)
    shutil.rmtree(run / "checkpoints" / "8")
    before = _snapshot(run)
    code = cli.main(_args(run, overrides, change))
    _one_line_error(capsys.readouterr().err, code, 2, named, "resume_overrides=")
    assert _snapshot(run) == before  # config.json and everything else untouched


def test_a_deliberate_change_at_resume_is_recorded(base, tmp_path, capsys):
    base_dir, overrides = base
    run = _copy(base_dir, tmp_path)
    shutil.rmtree(run / "checkpoints" / "8")
    assert cli.main(_args(run, overrides, "optim.lr=5e-4", "train.resume_overrides=optim.lr")) == 0
    resume = read_history(run)[-1]
    assert resume["event"] == "resume" and resume["step"] == 4
    assert resume["changed"] == {"optim.lr": [pytest.approx(3e-3), 5e-4]}
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 5e-4
    code = cli.main(_args(run, overrides, "train.resume_overrides=optim.typo"))
    _one_line_error(capsys.readouterr().err, code, 2, "optim.typo")


# ---------------------------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("override, named", [
    ("optim.lr=-1", "optim.lr=-1"),
    ("optim.b1=1.5", "optim.b1=1.5"),
    ("optim.warmup_steps=-3", "optim.warmup_steps=-3"),
    ("optim.grad_clip=-1.0", "optim.grad_clip=-1"),
    ("optim.min_lr_ratio=2.0", "optim.min_lr_ratio=2"),
    ("train.steps=0", "train.steps"),
    ("data.eval_fraction=0.0", "data.eval_fraction=0.0"),
    ("optim.b2=1.0", "optim.b2=1.0"),
    ("mesh.tensor=8", "8"),
    ("model.nope=1", "model.nope"),
])
def test_a_bad_config_exits_2_before_anything_is_written(base, tmp_path, capsys, override, named):
    _, overrides = base
    workdir = tmp_path / "fresh"
    code = cli.main(_args(workdir, overrides, override))
    _one_line_error(capsys.readouterr().err, code, 2, named)
    assert not workdir.exists()


def test_a_wrong_tokenizer_path_leaves_the_workdir_clean(base, tmp_path, capsys):
    """The tokenizer is checked against the model before it is copied: a wrong path never poisons the workdir."""
    _, overrides = base
    workdir = tmp_path / "fresh"
    code = cli.main(_args(workdir, overrides, "model.vocab_size=300"))
    _one_line_error(capsys.readouterr().err, code, 1, "has 512 pieces but model.vocab_size=300")
    assert not (workdir / "tokenizer.model").exists() and not (workdir / "config.json").exists()
    code = cli.main(_args(workdir, overrides, "tokenizer.path=/nonexistent/tok.model"))
    _one_line_error(capsys.readouterr().err, code, 1, "/nonexistent/tok.model")


# ---------------------------------------------------------------------------------------------- failed runs

def test_a_loss_spike_stops_the_run_before_a_checkpoint_of_it(base, tmp_path, capsys):
    _, overrides = base
    workdir = tmp_path / "spike"
    # warm-up to an absurd rate with no clipping: finite but exploding losses
    code = cli.main(_args(workdir, overrides, "optim.lr=300", "optim.warmup_steps=40", "optim.grad_clip=0",
                          "train.steps=20", "train.checkpoint_every=1"))
    err = capsys.readouterr().err
    _one_line_error(err, code, 1, "loss spike from step", "resume_overrides=optim.lr")
    event = read_history(workdir)[-1]
    assert event["event"] == "diverged"
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
    assert saved and max(saved) < event["step"]  # nothing from the spike on was saved
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(_params(workdir, max(saved))))


def test_a_full_disk_is_one_line_with_the_bytes_needed(base, tmp_path, capsys, monkeypatch):
    _, overrides = base

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
    code = cli.main(_args(tmp_path / "full", overrides))
    _one_line_error(capsys.readouterr().err, code, 1, "no space left", "bytes, ", "are free")


def test_corrupt_gzip_training_data_names_the_file(base, tmp_path, capsys):
    _, overrides = base
    data = tmp_path / "docs.jsonl.gz"
    data.write_bytes(gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n"
                                            for i in range(200)))[:-200] + b"\x00" * 200)
    code = cli.main(_args(tmp_path / "gz", overrides, f"data.train={data}", "data.format=jsonl"))
    _one_line_error(capsys.readouterr().err, code, 1, str(data))


def test_a_workdir_that_cannot_be_created_is_one_line(base, tmp_path, capsys):
    _, overrides = base
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = cli.main(_args(blocker / "run", overrides))
    _one_line_error(capsys.readouterr().err, code, 1, f"--workdir '{blocker / 'run'}' cannot be created")
    assert blocker.read_text() == "not a directory"


def test_debug_shows_the_traceback(base, tmp_path):
    _, overrides = base
    with pytest.raises(ValueError, match="optim.lr=-1"):
        cli.main(_args(tmp_path / "x", overrides, "optim.lr=-1") + ["--debug"])
