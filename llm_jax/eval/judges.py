"""Judges: what scores a model's responses. One protocol for every judge,

    judge.score(prompts, responses) -> float32 array, one score per response

where `prompts[i]` is the prompt record the response answers (a dict: `prompt`, and whatever else the record
carries, e.g. `reference`, `task`) and `responses[i]` the response's text.

Verifiable judges ship here, each comparing a response with its record's `reference` (1.0 right, 0.0 wrong):
- `exact_match`: the response equals the reference after stripping whitespace (`casefold=True` ignores case);
- `regex_match`: the reference is a regular expression the whole stripped response must match;
- `numeric_match`: the last number in the response is within `rel_tol`·max(1, |reference|) of the reference.

A user's own judge is named `module:function` (`load_judge("my_rewards:has_units")`): a function taking
`(prompts, responses)` and returning one number per response, imported from the Python path, checked on every
call for the number and finiteness of its scores.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Callable, Protocol, Sequence

import numpy as np


class JudgeError(ValueError):
    """A judge that cannot be loaded or returned scores that cannot be used (named with the judge)."""


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[dict], responses: Sequence[str]) -> np.ndarray: ...


def check_scores(scores, n: int, name: str) -> np.ndarray:
    """`scores` as a float32 vector of n finite values, or JudgeError naming the judge and what is wrong."""
    try:
        array = np.asarray(scores, np.float32)
    except (TypeError, ValueError) as e:
        raise JudgeError(f"judge {name} returned scores that are not numbers ({e})") from None
    if array.shape != (n,):
        raise JudgeError(f"judge {name} returned scores of shape {array.shape} for {n} responses; it must return "
                         "one number per response")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise JudgeError(f"judge {name} returned {array[bad]} for response {bad}: scores must be finite")
    return array


@dataclasses.dataclass(frozen=True)
class FunctionJudge:
    """A judge from a function of (prompts, responses) -> one score per response."""
    name: str
    fn: Callable[[Sequence[dict], Sequence[str]], Sequence[float]]

    def score(self, prompts: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise JudgeError(f"judge {self.name} got {len(prompts)} prompts for {len(responses)} responses")
        return check_scores(self.fn(prompts, responses), len(responses), self.name)


def _reference(prompt: dict, name: str, index: int) -> str:
    if "reference" not in prompt:
        raise JudgeError(f"judge {name} needs a 'reference' in every prompt record; prompt {index} has none "
                         f"(keys: {sorted(prompt)})")
    return str(prompt["reference"])


def exact_match(prompts: Sequence[dict], responses: Sequence[str], casefold: bool = False) -> list[float]:
    def norm(text: str) -> str:
        return text.strip().casefold() if casefold else text.strip()
    return [float(norm(r) == norm(_reference(p, "exact_match", i)))
            for i, (p, r) in enumerate(zip(prompts, responses))]


def regex_match(prompts: Sequence[dict], responses: Sequence[str]) -> list[float]:
    scores = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        pattern = _reference(p, "regex_match", i)
        try:
            scores.append(float(re.fullmatch(pattern, r.strip(), re.DOTALL) is not None))
        except re.error as e:
            raise JudgeError(f"judge regex_match: prompt {i}'s reference {pattern!r} is not a regular expression "
                             f"({e})") from None
    return scores


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(prompts: Sequence[dict], responses: Sequence[str], rel_tol: float = 1e-6) -> list[float]:
    scores = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        reference = last_number(_reference(p, "numeric_match", i))
        if reference is None:
            raise JudgeError(f"judge numeric_match: prompt {i}'s reference {p['reference']!r} holds no number")
        value = last_number(r)
        scores.append(float(value is not None and abs(value - reference) <= rel_tol * max(1.0, abs(reference))))
    return scores


BUILT_IN = {"exact_match": exact_match, "regex_match": regex_match, "numeric_match": numeric_match}


def load_judge(spec: str) -> FunctionJudge:
    """A built-in verifiable judge by name, or a user's `module:function` (module docstring)."""
    if spec in BUILT_IN:
        return FunctionJudge(spec, BUILT_IN[spec])
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise JudgeError(f"judge {spec!r} is neither a built-in ({', '.join(BUILT_IN)}) nor module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JudgeError(f"judge {spec!r}: module {module_name!r} does not import ({e})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise JudgeError(f"judge {spec!r}: {module_name} has no function {attribute!r}")
    return FunctionJudge(spec, fn)

