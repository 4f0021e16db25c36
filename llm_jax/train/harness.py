"""The run harness every loop runs on: one run directory's lifecycle, whatever a step does.

    harness = Harness(config, workdir)     # resuming? what changed since? (nothing written yet)
    ...                                    # the loop checks everything else it can, then
    harness.open()                         # makes the workdir
    harness.started(...) | harness.resumed(step)   # history.jsonl and the log
    summary = harness.run(loop, start)     # the cadence, metrics, evaluation, checkpoints, SIGTERM

A loop (the pretraining/SFT/RM/DPO loop in train/loop.py, the RL loop in rl/loop.py) supplies its steps as an
object with

    total                          steps (RL: iterations) of the whole run
    eval_at_start                  evaluate the starting params before step 1 of a fresh run
    step(step)                     runs step `step` (1-based)
    metrics(step) -> dict          what to log at a `train.log_every` step (and the last)
    evaluate(step) -> dict         the evaluation at a `train.eval_every` step (and the last)
    save(step) -> bool             a checkpoint at a `train.checkpoint_every` step (and the last, and on
                                   SIGTERM); False when the loop holds it back (a loss spike in progress)
    checkpoint_dir, last_saved     where checkpoints go; the newest saved step (for messages)
    finish() -> dict               after the last step: what the summary adds (final figures)
    close()                        releases checkpointers (always called)

and the harness does the rest the same way for every loop: the metrics writer (metrics.jsonl, TensorBoard),
the progress bar or log lines, SIGTERM (save, record "preempted" in history.jsonl, return with
`stopped_early`), a diverged run recorded in history.jsonl before its error propagates.

`CheckpointSet` keeps several checkpointers in step (the RL policy's and its value model's): a run resumes
from the newest step that every one of them holds intact, and a step that only some of them hold is set aside
and saved again whole.
"""
from __future__ import annotations

import sys
from typing import Protocol

import jax
from tqdm import tqdm

from llm_jax.train import run_record
from llm_jax.train.checkpoint import Checkpointer, CheckpointError, saved_steps
from llm_jax.train.guard import TrainingDiverged
from llm_jax.train.metrics import MetricsWriter, format_line, log_line
from llm_jax.train.preemption import StopSignal


class Loop(Protocol):
    total: int
    eval_at_start: bool
    checkpoint_dir: str
    last_saved: int | None

    def step(self, step: int) -> None: ...
    def metrics(self, step: int) -> dict: ...
    def evaluate(self, step: int) -> dict: ...
    def save(self, step: int) -> bool: ...
    def finish(self) -> dict: ...
    def close(self) -> None: ...


class Harness:
    """One run's lifecycle (module docstring). Constructing it writes nothing: a bad config found after it still
    leaves the workdir untouched."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.resuming = bool(saved_steps(workdir))
        # A resume that would change the run is refused here, before anything is built (train/run_record.py).
        self.changes = run_record.resume_changes(config, workdir) if self.resuming else {}
        self.writer: MetricsWriter | None = None

    def open(self) -> None:
        run_record.make_workdir(self.workdir)

    def started(self, **details) -> None:
        run_record.record(self.config, self.workdir, "start", 0, **details)

    def resumed(self, step: int) -> None:
        changed = ({"changed": self.changes, "resume_overrides": self.config.train.resume_overrides}
                   if self.changes else {})
        run_record.record(self.config, self.workdir, "resume", step, **changed)
        log_line(f"resumed {self.workdir} from step {step}" + (
            "; changed on purpose: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.changes.items())
            if self.changes else ""))

    def write(self, step: int, metrics: dict) -> None:
        """Metrics outside the cadence (e.g. a run's constants at step 0); only while `run` is running."""
        self.writer.write(step, metrics)

    def run(self, loop: Loop, start: int, before=None) -> dict:
        """Runs steps start + 1 .. loop.total (module docstring) -> summary. `before(harness)` is called once
        the metrics writer is open, before the first step (a loop's step-0 records)."""
        t = self.config.train
        total = loop.total
        self.writer = MetricsWriter(self.workdir, resume_step=start)
        summary = dict(workdir=self.workdir, start_step=start)
        show_bar = t.progress_bar and sys.stderr.isatty() and jax.process_index() == 0
        bar = tqdm(total=total, initial=start, disable=not show_bar, dynamic_ncols=True)

        def show(step: int, metrics: dict, always: bool = False) -> None:
            line = format_line(step, total, metrics)
            if bar.disable:
                log_line(line)
            else:
                bar.set_postfix_str(line.split("  ", 1)[-1] if "  " in line else "")
                if always:
                    bar.write(line, file=sys.stderr)

        def evaluate(step: int) -> None:
            evaluated = loop.evaluate(step)
            self.writer.write(step, evaluated)
            summary.update(evaluated)
            show(step, evaluated, always=True)

        step = start
        with StopSignal() as stop:
            try:
                if before is not None:
                    before(self)
                if start == 0 and loop.eval_at_start:
                    evaluate(0)
                while step < total:
                    step += 1
                    loop.step(step)
                    bar.update(1)
                    if step % t.log_every == 0 or step == total:
                        logged = loop.metrics(step)
                        self.writer.write(step, logged)
                        show(step, logged)
                    if step % t.eval_every == 0 or step == total:
                        evaluate(step)
                    if step % t.checkpoint_every == 0 or step == total:
                        loop.save(step)
                    if stop.agreed():
                        saved = loop.save(step)
                        log_line(f"SIGTERM: saved step {step} to {loop.checkpoint_dir}; rerun the same command to "
                                 "resume" if saved else f"SIGTERM at step {step}, during a loss spike: the newest "
                                 f"checkpoint is step {loop.last_saved}")
                        run_record.append_history(self.workdir, "preempted", step, saved=saved)
                        summary.update(stopped_early=True)
                        break
                summary.update(loop.finish())
            except TrainingDiverged as e:
                run_record.append_history(self.workdir, "diverged", e.step, reason=str(e),
                                          last_saved=loop.last_saved)
                raise
            finally:
                bar.close()
                self.writer.close()
                loop.close()
        summary.setdefault("step", step)
        return summary


class CheckpointSet:
    """Checkpointers saved and restored together (module docstring), by name; `main` (the first) holds the data
    iterator and the loop's extra state, and is saved last, so a step it holds has every other member."""

    def __init__(self, members: dict[str, Checkpointer]):
        self.members = members
        self.main = next(iter(members.values()))

    @property
    def directory(self) -> str:
        return self.main.directory

    def resume_step(self) -> int | None:
        """The newest step every member holds intact (damaged ones are set aside on the way); a newer step that
        only some members hold is set aside too, to be saved again whole. None when there is nothing to resume."""
        common = None
        for checkpointer in self.members.values():
            intact = set(checkpointer.intact_steps())
            common = intact if common is None else common & intact
        chosen = max(common) if common else None
        if chosen is None and any(c.manager.all_steps() for c in self.members.values()):
            raise CheckpointError(f"no step of {', '.join(c.directory for c in self.members.values())} is intact "
                                  "in every one of them: start the run again in a new --workdir")
        for checkpointer in self.members.values():
            for step in checkpointer.manager.all_steps():
                if chosen is not None and step > chosen:
                    checkpointer.set_aside(step, "the run's other checkpoints of this step are missing or damaged")
        return chosen

    def restore(self, abstract_states: dict, step: int, data_iterator=None) -> dict:
        """{name: state} of `step` (from `resume_step`)."""
        out = {}
        for name, checkpointer in self.members.items():
            try:
                out[name] = checkpointer.restore(abstract_states[name],
                                                 data_iterator if checkpointer is self.main else None, step=step)
            except FileNotFoundError as e:
                raise CheckpointError(f"{checkpointer.directory} has no checkpoint of step {step}") from e
        return out

    def restore_extra(self, step: int) -> dict:
        return self.main.restore_extra(step)

    def save(self, states: dict, step: int, data_iterator=None, extra: dict | None = None) -> None:
        for name, checkpointer in reversed(list(self.members.items())):
            if checkpointer is self.main:
                checkpointer.save(states[name], data_iterator, label=step, extra=extra)
            else:
                checkpointer.save(states[name], label=step)
                checkpointer.wait()  # the others first: a step of `main` always has them

    def wait(self) -> None:
        for checkpointer in self.members.values():
            checkpointer.wait()

    def close(self) -> None:
        errors = []
        for checkpointer in self.members.values():
            try:
                checkpointer.close()
            except Exception as e:  # noqa: BLE001 - every member is closed; the first error propagates after
                errors.append(e)
        if errors:
            raise errors[0]
