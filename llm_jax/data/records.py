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

Preferences (`iter_preference_examples` -> PreferenceExample), the HH-RLHF shape; chosen and rejected are two
assistant answers to the prompt and must differ:

    {"prompt": str | [message, ...], "chosen": str, "rejected": str}

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


def iter_preference_examples(spec: str, format: str = "auto") -> Iterator[PreferenceExample]:
    for where, record in iter_records(spec, format):
        yield preference_example(record, where)


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


def preference_example(record: dict, where: str) -> PreferenceExample:
    prompt = _prompt(record, where)
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text ({_short(chosen)})")
    return PreferenceExample(prompt, chosen, rejected, where)


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
