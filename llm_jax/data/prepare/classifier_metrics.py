"""Held-out metrics of a binary classifier's scores p(positive), labels 1 (positive) and 0 (negative).

At a threshold t a document is predicted positive when its score is >= t:
    precision = TP / (TP + FP)   (0 when nothing is predicted positive, scikit-learn's zero_division=0)
    recall    = TP / (TP + FN)
    F1        = 2 · precision · recall / (precision + recall)   (0 when both are 0)
    accuracy  = (TP + TN) / n
ROC AUC is threshold-free: the probability that a random positive scores above a random negative, ties counting
one half, computed from ranks (the Mann-Whitney U statistic): AUC = (Σ ranks of positives − P(P+1)/2) / (P·N).
"""
from __future__ import annotations

import numpy as np

PR_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal 1-d shapes")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))[:5]}")
    return scores, labels.astype(bool)


def at_threshold(scores, labels, threshold: float) -> dict:
    """Counts and rates at one threshold (module docstring)."""
    scores, positive = _check(scores, labels)
    predicted = scores >= threshold
    tp, fp = int(np.sum(predicted & positive)), int(np.sum(predicted & ~positive))
    fn, tn = int(np.sum(~predicted & positive)), int(np.sum(~predicted & ~positive))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(threshold=float(threshold), precision=precision, recall=recall, f1=f1,
                accuracy=(tp + tn) / max(len(scores), 1), tp=tp, fp=fp, fn=fn, tn=tn)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0          # ranks start+1 .. end, averaged
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """ROC AUC (module docstring); ValueError if either class is absent."""
    scores, positive = _check(scores, labels)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(scores, labels, threshold: float, thresholds=PR_THRESHOLDS) -> dict:
    """Everything the report shows: the rates at `threshold`, ROC AUC, and a precision/recall table."""
    result = at_threshold(scores, labels, threshold)
    result["roc_auc"] = roc_auc(scores, labels)
    result["positives"], result["negatives"] = result["tp"] + result["fn"], result["fp"] + result["tn"]
    result["pr_table"] = [at_threshold(scores, labels, t) for t in sorted(set(thresholds) | {threshold})]
    return result


def by_length(scores, labels, lengths, threshold: float, bins: int = 4) -> list[dict]:
    """The rates at `threshold` within `bins` groups of about equal size by document length (words): the mean of
    embeddings dilutes a short signal in a long document, and this shows how much."""
    scores, positive = _check(scores, labels)
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    rows = []
    for group in np.array_split(order, min(bins, len(order))):
        row = at_threshold(scores[group], positive[group].astype(int), threshold)
        row.update(min_words=int(lengths[group].min()), max_words=int(lengths[group].max()), docs=len(group))
        rows.append(row)
    return rows
