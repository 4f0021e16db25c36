"""The divergence guard: stops a run whose loss or gradient norm is not finite, or spikes far above its recent
values, before a checkpoint of the bad state is written.

A NaN is easy to see; a blow-up is not: with a learning rate far too high the loss climbs to 1e5 while staying
finite, then the model collapses to a uniform prediction (loss ln V, gradient norm 0) that looks calm. The guard
keeps the last `spike_window` steps' losses and gradient norms and calls step t a spike when

    loss_t > spike_loss_factor · median(loss over the window)  and  loss_t > median + spike_loss_margin,   or
    grad_norm_t > spike_grad_factor · median(grad_norm over the window)

(the margin, in nats, keeps a loss near zero, as late in SFT or DPO, from calling 0.05 after 0.01 a spike;
once the window holds at least `spike_min_history` steps; spiking steps do not enter the window). A spike that
lasts `spike_patience` steps in a row stops the run (TrainingSpiked); a single one is often a bad batch the
optimizer absorbs. While a spike is open the loop does not save a checkpoint, so the newest checkpoint always
predates it: resume from it with a lower learning rate (`--config.train.resume_overrides=optim.lr
--config.optim.lr=...`) or more warmup. `spike_loss_factor=0` turns the guard off.
"""
from __future__ import annotations

import collections
import math
import statistics


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite, or spiked (TrainingSpiked), at `step`."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingSpiked(TrainingDiverged):
    """The loss or gradient norm stayed far above its recent median for several steps."""


class DivergenceGuard:
    def __init__(self, train_config):
        get = train_config.get
        self.loss_factor = float(get("spike_loss_factor", 3.0))
        self.loss_margin = float(get("spike_loss_margin", 1.0))
        self.grad_factor = float(get("spike_grad_factor", 100.0))
        self.patience = int(get("spike_patience", 3))
        self.min_history = int(get("spike_min_history", 3))
        self.losses = collections.deque(maxlen=int(get("spike_window", 100)))
        self.grad_norms = collections.deque(maxlen=self.losses.maxlen)
        self.open_since: int | None = None  # first step of the spike in progress
        self.streak = 0

    @property
    def spiking(self) -> bool:
        """A spike is in progress: the state is suspect and must not be saved."""
        return self.streak > 0

    def check(self, step: int, loss: float, grad_norm: float, lr: float, last_saved: int | None,
              directory: str) -> None:
        """Takes one step's values; raises when the run must stop, saying which checkpoint survives."""
        kept = (f"the last good checkpoint, step {last_saved}, is intact in {directory}" if last_saved is not None
                else "no checkpoint had been saved yet")
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(f"non-finite training values at step {step}: loss={loss}, grad_norm={grad_norm}, "
                                   f"lr={lr:.3g}; nothing after it was saved and {kept}", step)
        reason = self._spike(loss, grad_norm)
        if reason is None:
            self.streak, self.open_since = 0, None
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            return
        self.streak += 1
        self.open_since = step if self.open_since is None else self.open_since
        if self.streak >= self.patience:
            how = ("rerun the same command with --config.train.resume_overrides=optim.lr and a lower "
                   "--config.optim.lr (or more optim.warmup_steps) to resume from it" if last_saved is not None
                   else "rerun with a lower --config.optim.lr (or more optim.warmup_steps)")
            raise TrainingSpiked(f"loss spike from step {self.open_since} to {step}: {reason} for {self.streak} "
                                 f"steps in a row (lr={lr:.3g}); nothing from the spike was saved and {kept}; {how}",
                                 self.open_since)

    def _spike(self, loss: float, grad_norm: float) -> str | None:
        if self.loss_factor <= 0 or len(self.losses) < self.min_history:
            return None
        loss_median, grad_median = statistics.median(self.losses), statistics.median(self.grad_norms)
        if loss > self.loss_factor * loss_median and loss > loss_median + self.loss_margin:
            return f"loss {loss:.4g} above {self.loss_factor:g}× its median {loss_median:.4g}"
        if self.grad_factor > 0 and grad_norm > self.grad_factor * grad_median:
            return f"grad_norm {grad_norm:.4g} above {self.grad_factor:g}× its median {grad_median:.4g}"
        return None
