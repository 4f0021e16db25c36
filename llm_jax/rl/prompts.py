"""An RL run's prompts: rendered once as fixed-shape arrays, taken in a resumable order, answers decoded.

    Prompts.read(spec, split, tokenizer, template, max_len, limit) -> Prompts
    iteration_prompts(n, batch, seed, iteration) -> indices      iteration i's prompts, a pure function
    refill_prompts(n, batch, seed, iteration, round) -> indices  dynamic sampling's further rounds
    response_texts(tokenizer, tokens_bn, mask_bn, stop_ids) -> the answers as the judges read them
"""
from __future__ import annotations

import dataclasses

import numpy as np

from llm_jax.data.post_training import resolve_spec
from llm_jax.generation_io import decode_response, padded_length, padding_id, read_prompts


@dataclasses.dataclass
class Prompts:
    """Rendered prompts as fixed-shape arrays: tokens (n, P) right-padded, lengths (n,), and the prompt records
    the judges read (data/records.py prompt_record)."""
    tokens: np.ndarray
    lengths: np.ndarray
    records: list[dict]

    @classmethod
    def read(cls, spec: str, split: str, tokenizer, template: str, max_len: int, limit=None, judge=None):
        """`judge`: when given, every record is checked against it (eval/judges.py `check_prompt`)."""
        rendered = read_prompts(resolve_spec(spec, "prompts", split), tokenizer, template=template,
                                max_len=max_len, judge=judge)[:limit]
        tokens = np.full((len(rendered), padded_length(max(len(p.tokens) for p in rendered))),
                         padding_id(tokenizer), np.int32)
        for i, p in enumerate(rendered):
            tokens[i, :len(p.tokens)] = p.tokens
        return cls(tokens, np.array([len(p.tokens) for p in rendered], np.int32), [p.record for p in rendered])

    def padded(self, width: int, pad_id: int) -> "Prompts":
        return dataclasses.replace(self, tokens=np.pad(self.tokens, ((0, 0), (0, width - self.tokens.shape[1])),
                                                       constant_values=pad_id))

    def take(self, index: np.ndarray) -> "Prompts":
        return Prompts(self.tokens[index], self.lengths[index], [self.records[i] for i in index])


def iteration_prompts(n: int, batch: int, seed: int, iteration: int) -> np.ndarray:
    """Indices of iteration i's prompts: the i-th block of `batch` in an endless sequence of permutations of
    range(n), one per pass (each a pure function of (seed, pass)); a block may span two passes."""
    start = (iteration - 1) * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng((seed, 7, epoch)).permutation(n)
        out.extend(perm[offset:offset + batch - len(out)].tolist())
    return np.asarray(out, np.int64)


def refill_prompts(n: int, batch: int, seed: int, iteration: int, round_: int) -> np.ndarray:
    """Prompts for round r ≥ 1 of iteration i's dynamic sampling: `batch` drawn without replacement (with, when
    n < batch) from range(n) by a generator of (seed, i, r) alone, so a resumed run draws the same."""
    rng = np.random.default_rng((seed, 13, iteration, round_))
    return rng.choice(n, size=batch, replace=n < batch).astype(np.int64)


def response_texts(tokenizer, tokens_bn, mask_bn, stop_ids) -> list[str]:
    return [decode_response(tokenizer, [int(t) for t in row[:int(m.sum())]], stop_ids)[0]
            for row, m in zip(tokens_bn, mask_bn)]
