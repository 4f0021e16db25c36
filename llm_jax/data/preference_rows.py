"""Batches of preferences for the reward model and DPO: one pair per row, or a prompt and several answers per row.

Records (records.py) are pairs, pairs with an edited answer, or rankings of several answers; each becomes the
answers to its prompt with their places (`records.RankedExample`), rendered once (`chat.render_answers`: the
prompt fitted to the longest answer, each answer as prompt + answer + <|end|> + eos). Its pairs are every
ordered pair of answers at different places. Records too long for `data.seq_len` + 1 tokens (after dropping
whole earlier exchanges) are skipped and counted (`n_<split>_too_long`), never cut inside an answer.

Held-out split. Without `data.eval` (and not an embedded task, which has its own), a stable hash of each record's
prompt holds out `data.eval_fraction` of the prompts: all answers and pairs of one prompt land on one side, so
no pair of a held-out prompt, nor another ranking of it, is trained on.

Layout "pairs" (`pair_rows`, DPO always and the reward model by default): one pair per row holding both sequences,
right-padded to seq_len, under `chosen_<k>` and `rejected_<k>` for k in PAIR_KEYS (segment_ids 1 on real
tokens; loss_mask 1 on the answer's tokens and its end marker). A ranking of k answers gives up to k(k−1)/2
rows, each encoding the prompt and two answers again.

Layout "packed" (`packed_rows`, `reward.layout=packed`): one row holds the prompt once and several of its
answers, in shuffled order (seeded by the run's seed and the record), each answer attending to the prompt and to
itself only:

    index     0 .. P−2            | P−1, answer a (A_a tokens) | P−1, answer b ...          | padding
    segment   PROMPT_SEGMENT (−1) | 1                          | 2                          | 0
    position  0 .. P−2            | P−1 .. P−1+A_a             | P−1 .. P−1+A_b             | 0

The prompt's last token (the assistant marker) starts every answer's segment: its output predicts the answer's
first token, and each answer then sees exactly the tokens it sees in its own pair row, at the same positions
(kernels/attention: keys of PROMPT_SEGMENT are visible to every other segment), so every answer's score,
gradient included, is the one the pairs layout computes. `response_last` (R,) holds each answer's last index
(its end marker, where the reward is read); `pair_better`, `pair_worse` (Q,) index the row's answers and
`pair_valid` (Q,) marks real pairs, with R = `reward.responses_per_row` and Q = R(R−1)/2.

A record whose answers do not all fit one row (more than R, or more than seq_len tokens together) is split over
several rows such that every pair lands in exactly one row (`row_groups`: greedy, each row started from the
first pair not yet placed and filled with answers that still owe a pair), and said in the log with its file and
line (the first few; `n_<split>_records_split` counts them all). A pair whose two answers do not fit one row
beside the prompt (pairs layout: each answer alone must fit) is skipped and counted (`n_<split>_pairs_too_long`).

Stats: `n_<split>_records`, `n_<split>_pairs`, `n_<split>_rows`, and `<split>_tokens_per_pair`, the real
(non-padding) tokens the rows hold per pair, the layouts' cost per comparison.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

import jax
import numpy as np

from llm_jax.data import chat, records
from llm_jax.data.lm_data import LMData
from llm_jax.data.post_training import (check_enough_rows, lm_data, messages_text, render_all, resolve_spec,
                                        split_examples)
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.kernels.attention.reference import PROMPT_SEGMENT  # keys visible to every segment of the row

PAIR_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
LAYOUTS = ("pairs", "packed")
PACKED_INDEX_KEYS = ("response_last", "pair_better", "pair_worse", "pair_valid")
SPLITS_LOGGED = 5  # records split over several rows named in the log; the rest counted


def pairs_per_row(responses_per_row: int) -> int:
    return responses_per_row * (responses_per_row - 1) // 2


def check_layout(layout: str, responses_per_row: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"reward.layout={layout!r} is not one of {LAYOUTS}")
    if layout == "packed" and responses_per_row < 2:
        raise ValueError(f"reward.responses_per_row must be ≥ 2 (a row compares its answers), got {responses_per_row}")


# ---------------------------------------------------------------------------------------------- pair layout

def _pair_side(tokens_list: Sequence[np.ndarray], masks: Sequence[np.ndarray], seq_len: int) -> dict:
    n = len(tokens_list)
    out = {k: np.zeros((n, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in PAIR_KEYS}
    for i, (tokens, mask) in enumerate(zip(tokens_list, masks)):
        m = len(tokens) - 1
        out["inputs"][i, :m] = tokens[:-1]
        out["targets"][i, :m] = tokens[1:]
        out["positions"][i, :m] = np.arange(m)
        out["segment_ids"][i, :m] = 1
        out["loss_mask"][i, :m] = mask
    return out


def pair_rows(pairs: Sequence[chat.RenderedPair], seq_len: int) -> dict[str, np.ndarray]:
    """One row per pair: `chosen_<k>` and `rejected_<k>` arrays of (n_pairs, seq_len)."""
    rows = {}
    for side in ("chosen", "rejected"):
        arrays = _pair_side([getattr(p, side) for p in pairs], [getattr(p, f"{side}_mask") for p in pairs], seq_len)
        rows.update({f"{side}_{k}": v for k, v in arrays.items()})
    return rows


# -------------------------------------------------------------------------------------------- packed layout

def row_groups(sizes: Sequence[int], base: int, pairs: Sequence[tuple[int, int]], seq_len: int,
                max_answers: int) -> tuple[list[tuple[list[int], list[tuple[int, int]]]], list[tuple[int, int]]]:
    """Rows covering every pair exactly once: ([(answers of the row, its pairs)], pairs that fit no row). A row
    of answers S needs base + Σ sizes[S] ≤ seq_len and |S| ≤ max_answers."""
    remaining, groups, unfit = list(pairs), [], []
    while remaining:
        i, j = remaining[0]
        if base + sizes[i] + sizes[j] > seq_len:
            unfit.append(remaining.pop(0))
            continue
        members, used = [i, j], base + sizes[i] + sizes[j]
        for k in dict.fromkeys(x for pair in remaining for x in pair):  # answers in the order their pairs come
            if len(members) == max_answers:
                break
            if k in members or used + sizes[k] > seq_len:
                continue
            if any((a == k and b in members) or (b == k and a in members) for a, b in remaining):
                members.append(k)
                used += sizes[k]
        placed = [(a, b) for a, b in remaining if a in members and b in members]
        remaining = [p for p in remaining if p not in placed]
        groups.append((members, placed))
    return groups, unfit


def _packed_row(rendered: chat.RenderedAnswers, members: Sequence[int], placed: Sequence[tuple[int, int]],
                seq_len: int, max_answers: int) -> dict[str, np.ndarray]:
    """One packed row (module docstring) of the answers `members`, in that order, and the pairs `placed`."""
    p = rendered.response_start
    row = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in PAIR_KEYS}
    row["inputs"][:p - 1] = rendered.prompt[:p - 1]
    row["targets"][:p - 1] = rendered.prompt[1:p]
    row["positions"][:p - 1] = np.arange(p - 1)
    row["segment_ids"][:p - 1] = PROMPT_SEGMENT
    last = np.zeros(max_answers, np.int32)
    at = p - 1
    for slot, answer in enumerate(members):
        sequence, mask = rendered.sequences[answer], rendered.masks[answer]
        n = len(sequence) - p  # the prompt's last token, the answer and its end marker
        row["inputs"][at:at + n] = sequence[p - 1:-1]
        row["targets"][at:at + n] = sequence[p:]
        row["positions"][at:at + n] = np.arange(p - 1, p - 1 + n)
        row["segment_ids"][at:at + n] = slot + 1
        row["loss_mask"][at:at + n] = mask[p - 1:]
        last[slot] = at + n - 1
        at += n
    n_pairs = pairs_per_row(max_answers)
    slot_of = {answer: slot for slot, answer in enumerate(members)}
    better, worse, valid = (np.zeros(n_pairs, np.int32), np.zeros(n_pairs, np.int32), np.zeros(n_pairs, np.float32))
    for q, (a, b) in enumerate(placed):
        better[q], worse[q], valid[q] = slot_of[a], slot_of[b], 1.0
    return {**row, "response_last": last, "pair_better": better, "pair_worse": worse, "pair_valid": valid}


def _check_prefix(rendered: chat.RenderedAnswers, where: str) -> None:
    """Packing shares one prompt: every answer's sequence must start with it and learn nothing inside it."""
    p = rendered.response_start
    for sequence, mask in zip(rendered.sequences, rendered.masks):
        if not np.array_equal(sequence[:p], rendered.prompt) or mask[:p - 1].any():
            raise chat.DataError(f"{where}: the chat template does not render the prompt as the start of every "
                                 "answer's conversation, so its answers cannot share one prompt in a packed row; "
                                 "use reward.layout=pairs")


def packed_rows(examples: Sequence[tuple[records.RankedExample, chat.RenderedAnswers]], seq_len: int,
                max_answers: int, seed: int, log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], dict]:
    """Packed rows of rendered rankings (module docstring) and their counts."""
    rows, counts = [], dict(pairs=0, pairs_too_long=0, records_split=0)
    for index, (example, rendered) in enumerate(examples):
        _check_prefix(rendered, example.where)
        p = rendered.response_start
        sizes = [len(s) - p for s in rendered.sequences]
        groups, unfit = row_groups(sizes, p - 1, example.pairs(), seq_len, max_answers)
        counts["pairs_too_long"] += len(unfit)
        if len(groups) > 1:
            counts["records_split"] += 1
            if counts["records_split"] <= SPLITS_LOGGED:
                log(f"{example.where}: {len(example.responses)} answers ({p - 1 + sum(sizes):,} tokens with the "
                    f"prompt) do not fit one row of data.seq_len={seq_len} and reward.responses_per_row="
                    f"{max_answers}: split into {len(groups)} rows, each pair in one of them")
        rng = np.random.default_rng((seed, index))
        for members, placed in groups:
            order = [members[i] for i in rng.permutation(len(members))]
            rows.append(_packed_row(rendered, order, placed, seq_len, max_answers))
            counts["pairs"] += len(placed)
    if counts["records_split"] > SPLITS_LOGGED:
        log(f"... {counts['records_split']:,} records split over several rows in all")
    if not rows:
        return _empty_packed(seq_len, max_answers), counts
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, counts


def _empty_packed(seq_len: int, max_answers: int) -> dict[str, np.ndarray]:
    q = pairs_per_row(max_answers)
    out = {k: np.zeros((0, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in PAIR_KEYS}
    return {**out, "response_last": np.zeros((0, max_answers), np.int32), "pair_better": np.zeros((0, q), np.int32),
            "pair_worse": np.zeros((0, q), np.int32), "pair_valid": np.zeros((0, q), np.float32)}


# -------------------------------------------------------------------------------------------------- reading

def _prompt_text(example: records.RankedExample) -> str:
    return messages_text(example.prompt)


def _real_tokens(rows: dict[str, np.ndarray]) -> int:
    sides = [k for k in rows if k.endswith("segment_ids")]
    return int(sum(np.count_nonzero(rows[k]) for k in sides))


def render_preferences(config, tokenizer: Tokenizer, workdir: str, layout: str = "pairs", responses_per_row: int = 2,
                       log: Callable[[str], None] | None = None) -> tuple[dict, dict, dict]:
    """(train rows, eval rows, stats) of the preference records of `config.data` in `layout`; see the module
    docstring. `data.use_edited` (default on) ranks an `edited` answer above its pair."""
    del workdir
    check_layout(layout, responses_per_row)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True) if jax.process_index() == 0 else None)
    data = config.data
    seq_len = int(data.seq_len)
    template = chat.get_template(data.get("chat_template", chat.DEFAULT_TEMPLATE))
    chat.check_template(tokenizer, template)
    use_edited = bool(data.get("use_edited", True))
    read = lambda spec: records.iter_ranked_examples(spec, data.format, use_edited)  # noqa: E731
    train, eval_ = split_examples(list(read(resolve_spec(data.train, "preferences", "train"))), data,
                                  "preferences", read, _prompt_text)
    stats, rows = {}, {}
    for name, examples in (("train", train), ("eval", eval_)):
        rendered, too_long = render_all(examples, lambda e: (e, chat.render_answers(
            e.prompt, e.responses, tokenizer, template, max_len=seq_len + 1, where=e.where)))
        if layout == "pairs":
            pairs = [r.pair(i, j) for e, r in rendered for i, j in e.pairs()]
            rows[name] = pair_rows(pairs, seq_len)
            counts = dict(pairs=len(pairs))
        else:
            rows[name], counts = packed_rows(rendered, seq_len, responses_per_row,
                                             int(config.seed) + (name == "eval"), log)
        n_rows = len(next(iter(rows[name].values())))
        stats.update({f"n_{name}_records": len(rendered), f"n_{name}_too_long": too_long, f"n_{name}_rows": n_rows,
                      **{f"n_{name}_{k}": v for k, v in counts.items()},
                      f"{name}_tokens_per_pair": _real_tokens(rows[name]) / max(counts["pairs"], 1)})
    check_enough_rows(data, stats["n_train_rows"])
    return rows["train"], rows["eval"], stats


def build_preference_data(config, tokenizer: Tokenizer, workdir: str, layout: str = "pairs",
                          responses_per_row: int = 2, log: Callable[[str], None] | None = None) -> LMData:
    train_rows, eval_rows, stats = render_preferences(config, tokenizer, workdir, layout, responses_per_row, log)
    return lm_data(train_rows, eval_rows, config, stats)
