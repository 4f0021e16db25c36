"""Judges: what scores a model's responses. One protocol for every judge,

    judge.score(prompts, responses) -> float64 array, one score per response

where `prompts[i]` is the prompt record the response answers (a dict: `prompt`, and whatever else the record
carries, e.g. `reference`, `task`) and `responses[i]` the response's text.

Verifiable judges ship here, each comparing a response with its record's `reference` (1.0 right, 0.0 wrong):
- `exact_match`: the response equals the reference after stripping whitespace (`casefold=True` ignores case);
- `regex_match`: the reference is a regular expression the whole stripped response must match;
- `numeric_match`: the last number in the response is within `rel_tol`·max(1, |reference|) of the reference.

A user's own judge is named `module:function` (`load_judge("my_rewards:has_units")`): a function taking
`(prompts, responses)` and returning one number per response, imported from the Python path, checked on every
call for the number and finiteness of its scores.

Two judges come with the project's stages:
- `gold` (`GoldJudge`): the embedded task's own program, `default_task.gold_score(last user turn, response)` in
  [0, 1]. It can judge only records with a "task" key (`applies`); the callers sample the others and count them.
- a reward run's directory (`RewardModelJudge`): the reward model's score of each response as it reads the
  record as written (`chat.render_pair`: prompt + answer + <|end|> + eos, the answer re-encoded from its text),
  the score a later stage trains on. `fits(prompt, response)` says whether the pair fits its context; `score`
  refuses one that does not. RL reads the same reward model on the sampled tokens in one jitted program
  (rl/rewards.py), the one place a judge is not called through `score`.

`load_judge(spec)` takes any of them: a built-in name, `gold`, a reward run directory, or `module:function`.
Optional methods a caller may use: `applies(prompt) -> bool` (default every prompt) and
`fits(prompt, response) -> bool` (default every pair).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from typing import Callable, Protocol, Sequence

import numpy as np

from llm_jax.data import chat, default_task
from llm_jax.data.records import Message, last_user_turn, prompt_record, record_messages  # noqa: F401 (re-exported)


class JudgeError(ValueError):
    """A judge that cannot be loaded or returned scores that cannot be used (named with the judge)."""


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[dict], responses: Sequence[str]) -> np.ndarray: ...


def check_scores(scores, n: int, name: str) -> np.ndarray:
    """`scores` as a float64 vector of n finite values, or JudgeError naming the judge and what is wrong. Float64
    keeps a judge's own numbers exactly: gold scores are ratios of small integers, and a margin of 1 − 0.8 must
    stay 0.2 to within preference_pairs' MARGIN_SLACK (in float32 it is 0.1999999881)."""
    try:
        array = np.asarray(scores, np.float64)
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
GOLD = "gold"


class GoldJudge:
    """The embedded task's program judges the records with a "task" key (module docstring)."""
    name = GOLD

    @staticmethod
    def applies(prompt: dict) -> bool:
        return "task" in prompt

    def check_prompt(self, prompt: dict, where: str) -> None:
        """DataError naming `where` for a "task" record whose prompt the task's program rejects."""
        from llm_jax.data.sources import DataError
        try:
            default_task.gold_score(last_user_turn(prompt), "")
        except ValueError as e:
            raise DataError(f"{where}: the record has a 'task' key, so its answer is scored by "
                            f"default_task.gold_score, which rejects the prompt: {e}") from e

    def score(self, prompts: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise JudgeError(f"judge gold got {len(prompts)} prompts for {len(responses)} responses")
        for i, p in enumerate(prompts):
            if not self.applies(p):
                raise JudgeError(f"judge gold judges only the embedded task's records (with a 'task' key); prompt "
                                 f"{i} has none (keys: {sorted(p)})")
        return check_scores([default_task.gold_score(last_user_turn(p), r) for p, r in zip(prompts, responses)],
                            len(responses), self.name)


class RewardModelJudge:
    """A reward run's model judges each response as it reads the record as written (module docstring). The
    model is loaded on first use (or by `load`), so a judge can be named and checked before it costs memory."""

    def __init__(self, run_dir: str, batch_size: int = 32):
        self.name, self.batch_size, self._scorer = run_dir, batch_size, None

    def load(self):
        """The reward run's scorer (objectives/reward.py RewardScorer), loaded once."""
        if self._scorer is None:
            from llm_jax.objectives import reward
            self._scorer = reward.load_scorer(self.name, self.batch_size)
        return self._scorer

    def render(self, prompt: dict, response: str, where: str = "response") -> tuple[np.ndarray, int]:
        """(sequence, answer start) as the reward model reads the pair; chat.ExampleTooLong past its context."""
        scorer = self.load()
        pair = chat.render_pair(record_messages(prompt), response, response, scorer.tokenizer, scorer.template,
                                max_len=scorer.max_len + 1, where=where)
        return pair.chosen, pair.response_start

    def fits(self, prompt: dict, response: str) -> bool:
        try:
            self.render(prompt, response)
        except chat.ExampleTooLong:
            return False
        return True

    def score_rendered(self, rendered: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
        """Scores of pairs `render` made: (sequence, answer start) each."""
        scores = self.load().score_tokens([r[0] for r in rendered], [r[1] for r in rendered])
        return check_scores(scores, len(rendered), self.name)

    def score(self, prompts: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise JudgeError(f"judge {self.name} got {len(prompts)} prompts for {len(responses)} responses")
        rendered = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                rendered.append(self.render(p, r, where=f"response {i}"))
            except chat.ExampleTooLong as e:
                raise JudgeError(f"judge {self.name}: {e}, the reward model's context") from None
        return self.score_rendered(rendered)


def load_judge(spec: str, *, batch_size: int = 32):
    """A judge by its spec: a built-in verifiable judge's name, `gold`, a reward run's directory, or a user's
    `module:function` (module docstring)."""
    if spec in BUILT_IN:
        return FunctionJudge(spec, BUILT_IN[spec])
    if spec == GOLD:
        return GoldJudge()
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise JudgeError(f"judge {spec!r} is a directory but not a run (no config.json)")
        from llm_jax.train.run_record import read_run_config
        objective = read_run_config(spec).objective
        if objective != "reward":
            raise JudgeError(f"judge {spec!r} is a {objective!r} run, not a reward model (config.objective "
                             "'reward')")
        return RewardModelJudge(spec, batch_size)
    if os.sep in spec or "/" in spec:
        raise JudgeError(f"judge {spec!r}: no such reward run directory")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise JudgeError(f"judge {spec!r} is neither a built-in ({', '.join([*BUILT_IN, GOLD])}), a reward run "
                         "directory, nor module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JudgeError(f"judge {spec!r}: module {module_name!r} does not import ({e})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise JudgeError(f"judge {spec!r}: {module_name} has no function {attribute!r}")
    return FunctionJudge(spec, fn)


def applies(judge, prompt: dict) -> bool:
    """Whether `judge` can judge `prompt` (its optional `applies`; every prompt by default)."""
    check = getattr(judge, "applies", None)
    return True if check is None else bool(check(prompt))
