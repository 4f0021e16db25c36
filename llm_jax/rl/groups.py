"""Host-side (numpy) choices over a rollout's groups and lengths, made before the update step sees the batch.

A group is rows [g·k, (g+1)·k): one prompt's k samples. DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale") adds three of these to GRPO:

    dynamic sampling     keep only groups whose scores differ (informative_groups), sample more prompts until
                         the batch is full (take_groups, fill_groups): a group of equal scores has zero
                         group-relative advantage everywhere and only dilutes the batch
    overlong shaping     a length penalty that grows linearly over the last `cache` tokens of the budget
                         (overlong_penalty), added to the score
    overlong filtering   responses cut off at the budget (did not stop) contribute no loss (overlong_filter)
"""
from __future__ import annotations

import numpy as np


def _check_group(n_rows: int, k: int) -> int:
    if k < 1 or n_rows % k:
        raise ValueError(f"{n_rows} rows are not whole groups of k={k} samples per prompt")
    return n_rows // k


def informative_groups(scores_b, k: int) -> np.ndarray:
    """(G,) bool: True where a group's scores are not all equal (max_g s > min_g s).

    DAPO's dynamic sampling keeps only these; a group of equal scores (all right, all wrong) gives every
    group-relative estimator (grpo, dr_grpo, rloo) exactly zero advantage. With k = 1 no group is informative.
    """
    scores_b = np.asarray(scores_b)
    s_gk = scores_b.reshape(_check_group(scores_b.shape[0], k), k)
    return s_gk.max(axis=1) > s_gk.min(axis=1)


def group_rows(groups, k: int) -> np.ndarray:
    """Row indices of the given groups, in order: group g is rows g·k … g·k + k − 1.

    `groups` is a (G,) bool mask over groups or a sequence of group indices."""
    groups = np.asarray(groups)
    index_g = np.flatnonzero(groups) if groups.dtype == bool else groups.astype(np.int64)
    return (index_g[:, None] * k + np.arange(k)[None, :]).reshape(-1)


def take_groups(batch, groups, k: int):
    """The rows of the given groups (group_rows) of an array or of a dict of arrays with rows first."""
    if isinstance(batch, dict):
        n_rows = {name: x.shape[0] for name, x in batch.items()}
        if len(set(n_rows.values())) > 1:
            raise ValueError(f"the batch's arrays have different numbers of rows: {n_rows}")
        rows = group_rows(groups, k)
        return {name: np.asarray(x)[rows] for name, x in batch.items()}
    return np.asarray(batch)[group_rows(groups, k)]


def fill_groups(parts, n_groups: int, k: int):
    """The first n_groups whole groups of the parts laid end to end -> (batch, groups taken).

    `parts` are dicts of arrays (rows first, the same keys and trailing shapes: pad responses to one length
    before), e.g. the informative groups of successive sampling rounds. Fewer than n_groups available: all of
    them, and the count says so (the caller samples again or goes on with a smaller batch).
    """
    if not parts:
        raise ValueError("fill_groups needs at least one part")
    keys = set(parts[0])
    for i, part in enumerate(parts):
        if set(part) != keys:
            raise ValueError(f"part {i} has keys {sorted(part)}, part 0 has {sorted(keys)}")
        for name, x in part.items():
            _check_group(np.shape(x)[0], k)
            if np.shape(x)[1:] != np.shape(parts[0][name])[1:]:
                raise ValueError(f"part {i}'s {name!r} has shape {np.shape(x)}, part 0's "
                                 f"{np.shape(parts[0][name])}: pad them to one length first")
    whole = {name: np.concatenate([np.asarray(part[name]) for part in parts]) for name in parts[0]}
    taken = min(n_groups, next(iter(whole.values())).shape[0] // k)
    return {name: x[:taken * k] for name, x in whole.items()}, taken


def overlong_penalty(lengths_b, max_new_tokens: int, cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment, float32, added to the score; L = max_new_tokens, c = cache:

        R(|y|) = 0                       |y| ≤ L − c
               = ((L − c) − |y|) / c     L − c < |y| ≤ L         (down to −1 at |y| = L)
               = −1                      |y| > L
    cache = 0: no ramp, 0 up to L.
    """
    if max_new_tokens < 1 or not 0 <= cache <= max_new_tokens:
        raise ValueError(f"overlong_penalty needs max_new_tokens >= 1 and 0 <= cache <= max_new_tokens, got "
                         f"max_new_tokens={max_new_tokens}, cache={cache}")
    lengths_b = np.asarray(lengths_b, np.float64)
    free = max_new_tokens - cache
    ramp_b = (free - lengths_b) / max(cache, 1)
    penalty_b = np.where(lengths_b <= free, 0.0, np.where(lengths_b <= max_new_tokens, ramp_b, -1.0))
    return penalty_b.astype(np.float32)


def overlong_filter(mask_bt, stopped_b) -> np.ndarray:
    """DAPO's overlong filtering: the loss mask with the rows of responses that did not stop zeroed,

        m'_bt = m_bt · 1[response b stopped]
    so a response cut off at the budget (its score says nothing about how it would have ended) adds no loss.
    """
    mask_bt, stopped_b = np.asarray(mask_bt), np.asarray(stopped_b, bool)
    if stopped_b.shape != mask_bt.shape[:1]:
        raise ValueError(f"stopped_b has shape {stopped_b.shape}, the mask {mask_bt.shape}: one flag per row")
    return mask_bt * stopped_b[:, None].astype(mask_bt.dtype)
