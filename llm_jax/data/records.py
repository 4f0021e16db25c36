"""Chat data: SFT conversations, preference pairs and prompts, read from records and validated into examples.

A spec is a file path, a glob, or a comma-separated list of those, read in `sources.resolve_files` order. Files
are jsonl (one JSON object per line, optionally .gz) or parquet (one record per row); the format comes from the
extension unless `format=` names it. Every example carries `where`, `"path:line"` or `"path: row N"`, and a bad
record raises DataError naming that place, the key and the bad value or type, before anything is tokenized.

A message is `{"role": "system" | "user" | "assistant", "content": str}`. The turns of a conversation are

    [system] user assistant (user assistant)*

an optional system message first, then user and assistant alternating from a user turn, ending with an assistant
turn. A prompt is the same up to a final user turn: `[system] user (assistant user)*`. A prompt may also be a
string: one user message, and then an optional `"system"` string key adds a system message before it.

SFT (`iter_sft_examples` -> SFTExample.messages), either form:

    {"messages": [message, ...]}                                  a conversation
    {"prompt": str | [message, ...], "response": str}             the prompt's messages, then the response as
                                                                  an assistant message

Preferences (`iter_ranked_examples` -> RankedExample; `iter_preference_examples` -> its pairs, PreferenceExample),
two shapes. The HH-RLHF pair, chosen better than rejected, with an optional `edited` answer (Llama 3: the chosen
answer as an annotator edited it) ranked above both, edited > chosen > rejected:

    {"prompt": str | [message, ...], "chosen": str, "rejected": str [, "edited": str]}

and a ranking of several answers, best first, where an entry may be a list of tied answers:

    {"prompt": str | [message, ...], "responses": [str, ...], "ranking": [int | [int, ...], ...]}
    e.g. "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]: c, then a and d tied, then b

The answers of one record must all differ, a ranking must list every answer exactly once and put at least two
of them at different places; `edited` needs `chosen`. A record's pairs are every ordered pair of its answers at
different places (a ranking of k answers without ties gives k(k-1)/2). `use_edited=False` reads `edited` as
absent (the pair alone), for measuring what the edits add.

Prompts (`iter_prompt_examples` -> PromptExample), for generation (PPO rollouts, rejection sampling, eval); every
key other than "prompt" and "system" is kept in `metadata` (e.g. a task id for a gold scorer):

    {"prompt": str | [message, ...], ...}

Other keys are ignored in SFT and preference records. Content may be empty, but may not contain the reserved
chat symbols (`<|user|>`, ...): the tokenizer reads those as turn markers even inside text. In parquet a null
is an error like any other wrong type, except a null "system", which counts as absent.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from llm_jax.data.sources import DataError, iter_file_records, resolve_files
from llm_jax.data.tokenizer import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class SFTExample:
    messages: tuple[Message, ...]  # a conversation: ends with an assistant turn
    where: str


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt: tuple[Message, ...]  # ends with a user turn
    chosen: str
    rejected: str
    where: str


@dataclasses.dataclass(frozen=True)
class RankedExample:
    """Answers to one prompt and their places in a ranking: levels[i] is answer i's place, 0 the best; answers
    with the same level are tied."""
    prompt: tuple[Message, ...]  # ends with a user turn
    responses: tuple[str, ...]
    levels: tuple[int, ...]
    where: str

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) answer indices: every ordered pair at different levels, better answers first."""
        order = sorted(range(len(self.responses)), key=lambda i: (self.levels[i], i))
        return [(i, j) for a, i in enumerate(order) for j in order[a + 1:] if self.levels[i] < self.levels[j]]

    def preference_examples(self) -> list[PreferenceExample]:
        return [PreferenceExample(self.prompt, self.responses[i], self.responses[j], self.where)
                for i, j in self.pairs()]


@dataclasses.dataclass(frozen=True)
class PromptExample:
    prompt: tuple[Message, ...]  # ends with a user turn
    metadata: dict[str, Any]
    where: str


def iter_records(spec: str, format: str = "auto") -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of every file the spec names."""
    for path in resolve_files(spec):
        yield from iter_file_records(path, format)


def iter_sft_examples(spec: str, format: str = "auto") -> Iterator[SFTExample]:
    for where, record in iter_records(spec, format):
        yield sft_example(record, where)


def iter_ranked_examples(spec: str, format: str = "auto", use_edited: bool = True) -> Iterator[RankedExample]:
    for where, record in iter_records(spec, format):
        yield ranked_example(record, where, use_edited)


def iter_preference_examples(spec: str, format: str = "auto", use_edited: bool = True) -> Iterator[PreferenceExample]:
    """Every pair of every record (a pair record is one; `edited` and rankings give several)."""
    for example in iter_ranked_examples(spec, format, use_edited):
        yield from example.preference_examples()


def iter_prompt_examples(spec: str, format: str = "auto") -> Iterator[PromptExample]:
    for where, record in iter_records(spec, format):
        yield prompt_example(record, where)


def sft_example(record: dict, where: str) -> SFTExample:
    if "messages" in record:
        other = [k for k in ("prompt", "response", "system") if k in record]
        if other:
            raise DataError(f"{where}: both 'messages' and {other[0]!r} given; use either 'messages' or "
                            f"'prompt' and 'response'")
        return SFTExample(parse_messages(record["messages"], where, "messages", last="assistant"), where)
    if "prompt" not in record:
        raise DataError(f"{where}: missing key 'messages' (or 'prompt' and 'response') (keys: {_keys(record)})")
    messages = _prompt(record, where) + (Message("assistant", _text(record, "response", where)),)
    return SFTExample(messages, where)


def ranked_example(record: dict, where: str, use_edited: bool = True) -> RankedExample:
    """A preference record of either shape (module docstring) as answers and their levels."""
    prompt = _prompt(record, where)
    if "responses" in record or "ranking" in record:
        other = [k for k in ("chosen", "rejected", "edited") if k in record]
        if other:
            raise DataError(f"{where}: both 'responses' and {other[0]!r} given; a record is either a ranking "
                            f"('responses', 'ranking') or a pair ('chosen', 'rejected' [, 'edited'])")
        responses = _texts(record, "responses", where)
        return RankedExample(prompt, responses, _levels(record, len(responses), where), where)
    if "edited" in record and "chosen" not in record:
        raise DataError(f"{where}: 'edited' without 'chosen': an edited answer is the chosen answer improved, so "
                        f"the record needs 'chosen' and 'rejected' (keys: {_keys(record)})")
    names = ("edited", "chosen", "rejected") if use_edited and "edited" in record else ("chosen", "rejected")
    responses = tuple(_text(record, name, where) for name in names)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            if responses[a] == responses[b]:
                raise DataError(f"{where}: {names[a]!r} and {names[b]!r} are the same text ({_short(responses[a])})")
    return RankedExample(prompt, responses, tuple(range(len(names))), where)


def _texts(record: dict, key: str, where: str) -> tuple[str, ...]:
    """A ranking's answers: a list of at least two different strings."""
    if key not in record:
        raise DataError(f"{where}: a ranking needs {key!r} beside 'ranking' (keys: {_keys(record)})")
    value = record[key]
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} is {_type(value)}, expected a list of answers")
    if len(value) < 2:
        raise DataError(f"{where}: {key!r} holds {len(value)} answer(s); a ranking compares at least 2")
    texts = tuple(_check_text(v, where, f"{key}[{i}]") for i, v in enumerate(value))
    first = {}
    for i, text in enumerate(texts):
        if text in first:
            raise DataError(f"{where}: {key}[{first[text]}] and {key}[{i}] are the same text ({_short(text)}); "
                            f"each answer of a ranking must differ")
        first[text] = i
    return texts


def _levels(record: dict, n: int, where: str) -> tuple[int, ...]:
    """levels[i], answer i's place in `ranking` (best first, lists are ties), after checking that the ranking
    names each of the n answers exactly once and puts two of them at different places."""
    if "ranking" not in record:
        raise DataError(f"{where}: 'responses' needs a 'ranking' (their indices, best first; a list for ties)")
    ranking = record["ranking"]
    if not isinstance(ranking, list):
        raise DataError(f"{where}: 'ranking' is {_type(ranking)}, expected a list of answer indices, best first")
    levels: dict[int, int] = {}
    for level, entry in enumerate(ranking):
        for index in entry if isinstance(entry, list) else [entry]:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise DataError(f"{where}: 'ranking' entry {index!r} is not an index of 'responses' (0 to {n - 1})")
            if index in levels:
                raise DataError(f"{where}: 'ranking' lists answer {index} twice")
            levels[index] = level
    missing = sorted(set(range(n)) - set(levels))
    if missing:
        raise DataError(f"{where}: 'ranking' does not list answer(s) {missing} of the {n} in 'responses'; every "
                        f"answer must be ranked (ties: a list of indices)")
    if len(set(levels.values())) < 2:
        raise DataError(f"{where}: 'ranking' puts every answer at one place ({ranking!r}): nothing to compare")
    return tuple(levels[i] for i in range(n))


def prompt_example(record: dict, where: str) -> PromptExample:
    metadata = {k: v for k, v in record.items() if k not in ("prompt", "system")}
    return PromptExample(_prompt(record, where), metadata, where)


def parse_messages(value: Any, where: str, key: str, last: str) -> tuple[Message, ...]:
    """Validates a list of {"role", "content"} dicts whose turns follow the order above and end with `last`."""
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} is {_type(value)}, expected a list of messages")
    if not value:
        raise DataError(f"{where}: {key!r} is an empty list")
    messages = []
    for i, m in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {name} is {_type(m)}, expected an object with 'role' and 'content'")
        for field in ("role", "content"):
            if field not in m:
                raise DataError(f"{where}: {name} is missing key {field!r} (keys: {_keys(m)})")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise DataError(f"{where}: {name}.role is {m['role']!r}, expected one of {ROLES}")
        messages.append(Message(m["role"], _check_text(m["content"], where, f"{name}.content")))
    roles = [m.role for m in messages]
    if last == "assistant" and "assistant" not in roles:
        raise DataError(f"{where}: {key!r} has no assistant turn (roles: {roles})")
    first = 1 if roles[0] == "system" else 0
    for i in range(first, len(roles)):
        want = ("user", "assistant")[(i - first) % 2]
        if roles[i] != want:
            raise DataError(f"{where}: {key}[{i}].role is {roles[i]!r}, expected {want!r} (turns go "
                            f"[system] user assistant user ...; roles: {roles})")
    if roles[-1] != last:
        raise DataError(f"{where}: {key!r} ends with role {roles[-1]!r}, expected {last!r} (roles: {roles})")
    return tuple(messages)


def _prompt(record: dict, where: str) -> tuple[Message, ...]:
    if "prompt" not in record:
        raise DataError(f"{where}: missing key 'prompt' (keys: {_keys(record)})")
    prompt, system = record["prompt"], record.get("system")
    if isinstance(prompt, list):
        if system is not None:
            raise DataError(f"{where}: 'system' goes with a prompt string; with a list of messages, put the "
                            f"system message first in 'prompt'")
        return parse_messages(prompt, where, "prompt", last="user")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' is {_type(prompt)}, expected a string or a list of messages")
    user = Message("user", _check_text(prompt, where, "'prompt'"))
    if system is None:
        return (user,)
    return Message("system", _check_text(system, where, "'system'")), user


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing key {key!r} (keys: {_keys(record)})")
    return _check_text(record[key], where, repr(key))


def _check_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} is {_type(value)}, expected a string")
    for symbol in SPECIAL_TOKENS:
        if symbol in value:
            raise DataError(f"{where}: {name} contains the reserved chat symbol {symbol!r}")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _keys(record: dict) -> list:
    return sorted(record)[:10]


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# The prompt record a judge reads (eval/judges.py): the record as the user wrote it, prompt and other keys.

def prompt_record(example: PromptExample) -> dict:
    """The prompt record a judge reads: `prompt` (a string, or the messages as dicts), `system` when the record
    had one, and the record's other keys (`task`, `reference`, ...)."""
    messages = example.prompt
    if len(messages) == 1:
        record = dict(prompt=messages[0].content)
    elif len(messages) == 2 and messages[0].role == "system":
        record = dict(prompt=messages[1].content, system=messages[0].content)
    else:
        record = dict(prompt=[dataclasses.asdict(m) for m in messages])
    return {**example.metadata, **record}


def record_messages(record: dict) -> list[Message]:
    """The messages of a prompt record (prompt_record's inverse)."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        system = [Message("system", record["system"])] if record.get("system") else []
        return system + [Message("user", prompt)]
    return [Message(m["role"], m["content"]) for m in prompt]


def last_user_turn(record: dict) -> str:
    """What a scorer of single-turn tasks reads as the prompt."""
    return record_messages(record)[-1].content
