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
    render_answers(prompt, answers)        the same for any number of answers to one prompt   rankings

so that, for a conversation m ending with an assistant turn, render_conversation(m) tokens ==
render_prompt(m[:-1]) + render_response(m[-1].content) + [eos].

Long examples: with `max_len` (tokens, bos and eos included), whole exchanges (a user turn and the assistant
answer after it) are dropped from the front, after any system message, until the rendering fits. The last
exchange of a conversation, the final user turn of a prompt, and the responses of a pair are always kept
whole: when they alone do not fit, ExampleTooLong (a DataError) names the example's `where`. Text is never cut.

Templates are looked up by name (a config string) in TEMPLATES. A template of the same shape (special symbols
opening each role's turn, one symbol closing every turn) is one more ChatTemplate entry there.

Jinja templates. `data.chat_template` may also be "hf" (the tokenizer's own template, e.g. an imported Hugging Face
checkpoint's) or a path to a .jinja file; chat_template.py renders them exactly as transformers does. Then

    render_conversation(messages)          encode(render(messages)), the loss mask derived from the rendering
    render_prompt(messages)                encode(render(messages, add_generation_prompt=True))
    render_response(text)                  A and the template's end-of-turn token (<|im_end|>, <|eot_id|>, ...)
    stop_ids()                             the end-of-turn token, then the tokenizer's eos_ids
    render_pair(prompt, chosen, rejected)  each answer's whole conversation, response_start = len(prompt), the
                                           masks on the final answer only

with the same loss-mask convention and the same max_len rule (the rendered length must fit; whole early
exchanges are dropped). The template writes bos itself, so none is added.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np

from llm_jax.data.chat_template import BoundTemplate, JinjaTemplate, TokenizerTemplate, bind, tokenizer_template
from llm_jax.data.records import Message
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer_files import AnyTokenizer as Tokenizer


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
TOKENIZER_TEMPLATE = "hf"  # data.chat_template: the tokenizer's own jinja template
LEARNED_ROLE = "assistant"
Template = str | ChatTemplate | JinjaTemplate | TokenizerTemplate


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


@dataclasses.dataclass(frozen=True)
class RenderedAnswers:
    """A prompt and k answers to it, rendered as `render_pair` renders two (the prompt fits the longest)."""
    prompt: np.ndarray                  # (P,) int32
    sequences: tuple[np.ndarray, ...]   # each (P + R_i + 1,) int32: prompt, answer, <|end|>, eos
    response_start: int                 # = P
    masks: tuple[np.ndarray, ...]       # each (len(sequence) - 1,) float32

    def pair(self, better: int, worse: int) -> RenderedPair:
        return RenderedPair(self.prompt, self.sequences[better], self.sequences[worse], self.response_start,
                            self.masks[better], self.masks[worse])


def get_template(template: Template) -> ChatTemplate | JinjaTemplate | TokenizerTemplate:
    """A built-in template by name, "hf" (resolved with a tokenizer), or a .jinja file (read and compiled)."""
    if isinstance(template, (ChatTemplate, JinjaTemplate, TokenizerTemplate)):
        return template
    if template == TOKENIZER_TEMPLATE:
        return TokenizerTemplate()
    if isinstance(template, str) and template.endswith(".jinja"):
        return _jinja_file(template)
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}, "
                         f"{TOKENIZER_TEMPLATE!r} or a path to a .jinja file")
    return TEMPLATES[template]


@functools.lru_cache(maxsize=8)
def _jinja_file(path: str) -> JinjaTemplate:
    return JinjaTemplate.from_file(path)


def _bound(template: Template, tokenizer: Tokenizer) -> BoundTemplate | None:
    """A jinja template (a file's, or the tokenizer's own for "hf") bound to the tokenizer; None for a built-in."""
    t = get_template(template)
    if isinstance(t, ChatTemplate):
        return None
    if isinstance(t, TokenizerTemplate):
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.path} has no chat template, which "
                             f"data.chat_template={TOKENIZER_TEMPLATE!r} asks for")
        t = tokenizer_template(tokenizer.chat_template, getattr(tokenizer, "chat_template_origin", tokenizer.path))
    return bind(t, tokenizer)


def check_template(tokenizer: Tokenizer, template: Template = DEFAULT_TEMPLATE) -> dict[str, int]:
    """The id of every symbol the template uses; fails naming the tokenizer and the symbol it lacks. For a jinja
    template: its end-of-turn token (none when the template ends a turn with plain text), after rendering a probe."""
    if (bound := _bound(template, tokenizer)) is not None:
        end = bound.end_of_turn
        return {} if end is None else {tokenizer.id_to_piece(end): end}
    t = get_template(template)
    ids = {}
    for symbol in (*(s for marker in t.markers.values() for s in marker), t.end):
        try:
            ids[symbol] = tokenizer.special_id(symbol)
        except KeyError as e:
            raise ValueError(f"tokenizer {tokenizer.path} has no special symbol {symbol!r}, which chat template "
                             f"{t.name!r} needs") from e
    return ids


def stop_ids(tokenizer: Tokenizer, template: Template = DEFAULT_TEMPLATE) -> tuple[int, ...]:
    """The ids that end a response: the template's end of turn, then eos (for jinja: all of tokenizer.eos_ids)."""
    if (bound := _bound(template, tokenizer)) is not None:
        return bound.stop_ids
    return check_template(tokenizer, template)[get_template(template).end], tokenizer.eos_id


def render_conversation(messages: Sequence[Message], tokenizer: Tokenizer, template: Template = DEFAULT_TEMPLATE,
                        max_len: int | None = None, where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, loss_mask float32 of len(tokens) - 1) for a conversation ending with an assistant turn."""
    _check_last(messages, "assistant", "a conversation", where)
    if (bound := _bound(template, tokenizer)) is not None:
        ids, learned = _fit_messages(messages, lambda kept: bound.conversation(kept, where), lambda r: len(r[0]),
                                     max_len, where)
        return np.asarray(ids, np.int32), np.asarray(learned[1:], np.float32)
    turns = _render_turns(messages, tokenizer, template, where)
    turns = _fit(turns, messages, 2, max_len, where)
    tokens = [tokenizer.bos_id] + [i for ids, _ in turns for i in ids] + [tokenizer.eos_id]
    learned = [0] + [x for _, mask in turns for x in mask] + [0]
    return np.asarray(tokens, np.int32), np.asarray(learned[1:], np.float32)


def render_prompt(messages: Sequence[Message], tokenizer: Tokenizer, template: Template = DEFAULT_TEMPLATE,
                  max_len: int | None = None, where: str = "prompt") -> np.ndarray:
    """[bos] turns <|assistant|>: a prompt ending with a user turn, ready for the model to answer."""
    if (bound := _bound(template, tokenizer)) is not None:
        _check_last(messages, "user", "a prompt", where)
        return np.asarray(_fit_messages(messages, lambda kept: bound.prompt(kept, where), len, max_len, where),
                          np.int32)
    return _prompt_tokens(messages, tokenizer, template, 0, max_len, where)


def render_response(text: str, tokenizer: Tokenizer, template: Template = DEFAULT_TEMPLATE,
                    where: str = "response") -> np.ndarray:
    """A <|end|>: an assistant answer as the model should generate it (no eos: generation stops at <|end|>)."""
    if (bound := _bound(template, tokenizer)) is not None:
        return np.asarray(bound.response(text, where), np.int32)
    (ids, _), = _render_turns([Message(LEARNED_ROLE, text)], tokenizer, template, where)
    n_marker = len(get_template(template).markers[LEARNED_ROLE])
    return np.asarray(ids[n_marker:], np.int32)


def render_pair(prompt: Sequence[Message], chosen: str, rejected: str, tokenizer: Tokenizer,
                template: Template = DEFAULT_TEMPLATE, max_len: int | None = None, where: str = "pair") -> RenderedPair:
    """A prompt and two answers to it, each as the full sequence prompt + answer + <|end|> + eos."""
    return render_answers(prompt, (chosen, rejected), tokenizer, template, max_len, where).pair(0, 1)


def render_answers(prompt: Sequence[Message], answers: Sequence[str], tokenizer: Tokenizer,
                   template: Template = DEFAULT_TEMPLATE, max_len: int | None = None,
                   where: str = "answers") -> RenderedAnswers:
    """A prompt and its answers, each as prompt + answer + <|end|> + eos; the prompt is rendered once, with as
    many early exchanges dropped as the longest answer needs, so every sequence starts with the same prompt."""
    if (bound := _bound(template, tokenizer)) is not None:
        return _jinja_answers(prompt, answers, bound, max_len, where)
    rendered = [render_response(text, tokenizer, template, where) for text in answers]
    # The eos and the longest answer must fit beside the prompt; only the prompt's early exchanges may go.
    prompt_ids = _prompt_tokens(prompt, tokenizer, template, 1 + max(len(a) for a in rendered), max_len, where)
    start = len(prompt_ids)
    full = tuple(np.concatenate([prompt_ids, a, [tokenizer.eos_id]]).astype(np.int32) for a in rendered)
    return RenderedAnswers(prompt_ids, full, start, tuple(answer_mask(len(f), start) for f in full))


def answer_mask(n_tokens: int, response_start: int) -> np.ndarray:
    """The loss mask over the n_tokens − 1 targets of prompt + answer + <|end|> + eos whose answer starts at
    `response_start`: 1 on the answer's tokens and its <|end|>, 0 on the prompt and the final eos."""
    mask = np.zeros(n_tokens - 1, np.float32)
    mask[response_start - 1:n_tokens - 2] = 1.0
    return mask


def _jinja_answers(prompt, answers, bound, max_len, where) -> RenderedAnswers:
    """Each answer's conversation rendered whole, the mask on the final answer only; all must fit max_len."""
    _check_last(prompt, "user", "a prompt", where)

    def render(kept):
        return bound.prompt(kept, where), [bound.conversation((*kept, Message(LEARNED_ROLE, answer)), where,
                                                              turns=[len(kept)]) for answer in answers]

    prompt_ids, sides = _fit_messages(prompt, render, lambda r: max(len(ids) for ids, _ in r[1]), max_len, where)
    return RenderedAnswers(np.asarray(prompt_ids, np.int32), tuple(np.asarray(ids, np.int32) for ids, _ in sides),
                           len(prompt_ids), tuple(np.asarray(learned[1:], np.float32) for _, learned in sides))


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
    first, exchange_starts = _exchange_starts(messages)
    for start in exchange_starts[1:]:
        kept = turns[:first] + turns[start:]
        total = n_fixed + sum(len(ids) for ids, _ in kept)
        if total <= max_len:
            return kept
    raise ExampleTooLong(f"{where}: {total} tokens with only the last exchange kept, more than max_len={max_len}")


def _fit_messages(messages, render, length, max_len, where):
    """render(messages), else render() of the messages kept as _fit keeps them: the first that fits max_len."""
    result = render(messages)
    if max_len is None or length(result) <= max_len:
        return result
    first, exchange_starts = _exchange_starts(messages)
    for start in exchange_starts[1:]:
        result = render([*messages[:first], *messages[start:]])
        if length(result) <= max_len:
            return result
    raise ExampleTooLong(f"{where}: {length(result)} tokens with only the last exchange kept, more than "
                         f"max_len={max_len}")


def _exchange_starts(messages) -> tuple[int, list[int]]:
    """(index after the system message, the index of every exchange's user turn from there)."""
    first = 1 if messages[0].role == "system" else 0
    return first, [i for i in range(first, len(messages)) if messages[i].role == "user"] or [first]


def _check_last(messages, role, what, where) -> None:
    if not messages or messages[-1].role != role:
        last = repr(messages[-1].role) if messages else "no message"
        raise DataError(f"{where}: {what} must end with role {role!r}, got {last}")
