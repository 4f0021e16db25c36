"""Preemption: SIGTERM becomes a flag every loop checks between steps, agreed across processes, so a preempted
run saves a checkpoint at a step boundary and a rerun of the same command resumes it."""
from __future__ import annotations

import signal

import jax
import numpy as np


class StopSignal:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: preemption handling is the caller's business
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """All processes stop together: one process's signal stops every process at the same step."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
