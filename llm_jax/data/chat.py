"""Chat templates: messages to token ids and a loss mask, rendered the same way for training and generation.

The default template, "chatml_min", renders a conversation (see records.py for the message order) as

    [bos] (<|system|> S <|end|>)? (<|user|> U <|end|> <|assistant|> A <|end|>)+ [eos]

S, U, A are `tokenizer.encode(content)` of each message on its own, so no piece spans a marker and the prompt
rendered for generation is exactly a prefix of the conversation rendered for training. The markers are the
tokenizer's special ids (`Tokenizer.special_id`); bos and eos are ids 2 and 3. Each content encodes with
sentencepiece's leading word marker, so decoding a whole rendering shows a space after each role marker.

The loss mask has one value per target (target i is tokens[i + 1], as in `packing.pack_documents`): 1 exactly
where the target is assistant content or the <|end|> closing an assistant turn (the model must learn to stop),
0 on bos, eos, role markers, system and user content and the <|end|> of their turns.

    render_conversation(messages)          [bos] turns [eos], loss mask                       SFT
    render_prompt(messages)                [bos] turns <|assistant|>                           generation
    render_response(text)                  A <|end|>: a finished generated answer
    stop_ids()                             (<|end|>, eos): the ids that end a response
    render_pair(prompt, chosen, rejected)  prompt + A + <|end|> + [eos] per answer and the      RM, DPO
                                           index where A starts

so that, for a conversation m ending with an assistant turn, render_conversation(m) tokens ==
render_prompt(m[:-1]) + render_response(m[-1].content) + [eos].

Long examples: with `max_len` (tokens, bos and eos included), whole exchanges (a user turn and the assistant
answer after it) are dropped from the front, after any system message, until the rendering fits. The last
exchange of a conversation, the final user turn of a prompt, and the responses of a pair are always kept
whole: when they alone do not fit, ExampleTooLong (a DataError) names the example's `where`. Text is never cut.

Templates are looked up by name (a config string) in TEMPLATES. A template of the same shape (special symbols
opening each role's turn, one symbol closing every turn) is one more ChatTemplate entry there.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from llm_jax.data.records import Message
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    markers: Mapping[str, tuple[str, ...]]  # role -> special symbols opening its turn
    end: str                                # special symbol closing every turn; learned after an assistant turn


TEMPLATES = {t.name: t for t in (
    ChatTemplate("chatml_min", {"system": ("<|system|>",), "user": ("<|user|>",),
                                "assistant": ("<|assistant|>",)}, "<|end|>"),
)}
DEFAULT_TEMPLATE = "chatml_min"
LEARNED_ROLE = "assistant"


class ExampleTooLong(DataError):
    """An example whose kept turns alone exceed max_len; a pipeline may catch it to skip and count."""


@dataclasses.dataclass(frozen=True)
class RenderedPair:
    """A prompt and its two answers; the masks are over targets and 1 on the answer's content and <|end|>."""
    prompt: np.ndarray          # (P,) int32, ends with the assistant marker
    chosen: np.ndarray          # (P + Rc + 1,) int32: prompt, answer, <|end|>, eos
    rejected: np.ndarray        # (P + Rr + 1,) int32
    response_start: int         # = P: chosen[P:] and rejected[P:] are the answers
    chosen_mask: np.ndarray     # (len(chosen) - 1,) float32
    rejected_mask: np.ndarray   # (len(rejected) - 1,) float32


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def check_template(tokenizer: Tokenizer, template: str | ChatTemplate = DEFAULT_TEMPLATE) -> dict[str, int]:
    """The id of every symbol the template uses; fails naming the tokenizer and the symbol it lacks."""
    t = get_template(template)
    ids = {}
    for symbol in (*(s for marker in t.markers.values() for s in marker), t.end):
        try:
            ids[symbol] = tokenizer.special_id(symbol)
        except KeyError as e:
            raise ValueError(f"tokenizer {tokenizer.path} has no special symbol {symbol!r}, which chat template "
                             f"{t.name!r} needs") from e
    return ids


def stop_ids(tokenizer: Tokenizer, template: str | ChatTemplate = DEFAULT_TEMPLATE) -> tuple[int, int]:
    return check_template(tokenizer, template)[get_template(template).end], tokenizer.eos_id


def render_conversation(messages: Sequence[Message], tokenizer: Tokenizer,
                        template: str | ChatTemplate = DEFAULT_TEMPLATE, max_len: int | None = None,
                        where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, loss_mask float32 of len(tokens) - 1) for a conversation ending with an assistant turn."""
    _check_last(messages, "assistant", "a conversation", where)
    turns = _render_turns(messages, tokenizer, template, where)
    turns = _fit(turns, messages, 2, max_len, where)
    tokens = [tokenizer.bos_id] + [i for ids, _ in turns for i in ids] + [tokenizer.eos_id]
    learned = [0] + [x for _, mask in turns for x in mask] + [0]
    return np.asarray(tokens, np.int32), np.asarray(learned[1:], np.float32)


def render_prompt(messages: Sequence[Message], tokenizer: Tokenizer,
                  template: str | ChatTemplate = DEFAULT_TEMPLATE, max_len: int | None = None,
                  where: str = "prompt") -> np.ndarray:
    """[bos] turns <|assistant|>: a prompt ending with a user turn, ready for the model to answer."""
    return _prompt_tokens(messages, tokenizer, template, 0, max_len, where)


def render_response(text: str, tokenizer: Tokenizer, template: str | ChatTemplate = DEFAULT_TEMPLATE,
                    where: str = "response") -> np.ndarray:
    """A <|end|>: an assistant answer as the model should generate it (no eos: generation stops at <|end|>)."""
    (ids, _), = _render_turns([Message(LEARNED_ROLE, text)], tokenizer, template, where)
    n_marker = len(get_template(template).markers[LEARNED_ROLE])
    return np.asarray(ids[n_marker:], np.int32)


def render_pair(prompt: Sequence[Message], chosen: str, rejected: str, tokenizer: Tokenizer,
                template: str | ChatTemplate = DEFAULT_TEMPLATE, max_len: int | None = None,
                where: str = "pair") -> RenderedPair:
    """A prompt and two answers to it, each as the full sequence prompt + answer + <|end|> + eos."""
    answers = [render_response(text, tokenizer, template, where) for text in (chosen, rejected)]
    # The eos and the longer answer must fit beside the prompt; only the prompt's early exchanges may go.
    prompt_ids = _prompt_tokens(prompt, tokenizer, template, 1 + max(len(a) for a in answers), max_len, where)
    start = len(prompt_ids)
    full = [np.concatenate([prompt_ids, a, [tokenizer.eos_id]]).astype(np.int32) for a in answers]
    return RenderedPair(prompt_ids, full[0], full[1], start, answer_mask(len(full[0]), start),
                        answer_mask(len(full[1]), start))


def answer_mask(n_tokens: int, response_start: int) -> np.ndarray:
    """The loss mask over the n_tokens − 1 targets of prompt + answer + <|end|> + eos whose answer starts at
    `response_start`: 1 on the answer's tokens and its <|end|>, 0 on the prompt and the final eos."""
    mask = np.zeros(n_tokens - 1, np.float32)
    mask[response_start - 1:n_tokens - 2] = 1.0
    return mask


def _prompt_tokens(messages, tokenizer, template, extra, max_len, where) -> np.ndarray:
    _check_last(messages, "user", "a prompt", where)
    symbols = check_template(tokenizer, template)
    marker = [symbols[s] for s in get_template(template).markers[LEARNED_ROLE]]
    turns = _render_turns(messages, tokenizer, template, where)
    turns = _fit(turns, messages, 1 + len(marker) + extra, max_len, where)
    return np.asarray([tokenizer.bos_id] + [i for ids, _ in turns for i in ids] + marker, np.int32)


def _render_turns(messages, tokenizer, template, where) -> list[tuple[list[int], list[int]]]:
    """Per message: its token ids (marker, content, end) and per token 1 if it is learned as a target."""
    t = get_template(template)
    symbols = check_template(tokenizer, t)
    turns = []
    for i, m in enumerate(messages):
        if m.role not in t.markers:
            raise DataError(f"{where}: message {i} has role {m.role!r}; chat template {t.name!r} knows "
                            f"{sorted(t.markers)}")
        # User-defined pieces match inside text too: such content would render as a turn boundary.
        for symbol in symbols:
            if symbol in m.content:
                raise DataError(f"{where}: message {i} ({m.role}) contains the reserved chat symbol {symbol!r}")
        content = tokenizer.encode(m.content)
        marker = [symbols[s] for s in t.markers[m.role]]
        learned = int(m.role == LEARNED_ROLE)
        turns.append((marker + content + [symbols[t.end]], [0] * len(marker) + [learned] * (len(content) + 1)))
    return turns


def _fit(turns, messages, n_fixed, max_len, where):
    """The turns kept under max_len: the system turn, then whole exchanges dropped from the front (see above)."""
    total = n_fixed + sum(len(ids) for ids, _ in turns)
    if max_len is None or total <= max_len:
        return turns
    first = 1 if messages[0].role == "system" else 0
    exchange_starts = [i for i in range(first, len(messages)) if messages[i].role == "user"] or [first]
    for start in exchange_starts[1:]:
        kept = turns[:first] + turns[start:]
        total = n_fixed + sum(len(ids) for ids, _ in kept)
        if total <= max_len:
            return kept
    raise ExampleTooLong(f"{where}: {total} tokens with only the last exchange kept, more than max_len={max_len}")


def _check_last(messages, role, what, where) -> None:
    if not messages or messages[-1].role != role:
        last = repr(messages[-1].role) if messages else "no message"
        raise DataError(f"{where}: {what} must end with role {role!r}, got {last}")
