"""Jinja chat templates (a Hugging Face checkpoint's own, or a .jinja file) rendered as transformers renders them,
and the SFT loss mask derived from the rendering, for any template.

Rendering. `JinjaTemplate` compiles the source the way transformers' `apply_chat_template` does (a sandboxed,
immutable jinja environment with trim_blocks, lstrip_blocks and loop controls; a `tojson` filter that leaves
non-ASCII and HTML characters alone; `raise_exception` and `strftime_now`; the `{% generation %}` tag) and renders
with the same variables: messages, add_generation_prompt, tools=None, documents=None, the tokenizer's named special
tokens (bos_token, eos_token, ...) and any extra variables of the template (e.g. enable_thinking). The template
writes bos itself, so a rendering is tokenized with `tokenizer.encode` (no special tokens added), as transformers
tokenizes it.

Loss mask (`content_spans`, `learned_tokens`). A target is learned exactly where it is assistant content or the
end-of-turn token right after it. For assistant message i, the rendering of messages[:i] with the generation
prompt is normally a prefix of the whole rendering, and the content is the first occurrence of its text after that
prefix (after any scaffolding the template adds, e.g. Qwen 3's empty <think></think>). A template that renders
earlier turns differently once later turns follow (Mistral moves the system message into the last user turn) fails
that prefix check; the content is then looked for after the previous messages' contents, in order. A template that
trims content (Llama 3, Gemma) is matched on the stripped text. Characters map to tokens through the tokenizer's
offsets: the learned tokens are those overlapping the content's span, plus the token right after them when it is
a stop id (<|eot_id|>, <|im_end|>, <end_of_turn>, </s>). Content that is not in the rendering at all fails,
naming the template and the message. `BoundTemplate` applies this to a template and a tokenizer; its end-of-turn
token is the special token that follows the content of a probe conversation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Callable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from llm_jax.data.records import Message
from llm_jax.data.sources import DataError

PROBE = (Message("user", "Hi"), Message("assistant", "Hello"))  # a conversation every template can render
RenderText = Callable[[Sequence[Message], bool], str]            # (messages, add_generation_prompt) -> text
Tokenize = Callable[[str], tuple[Sequence[int], Sequence[tuple[int, int]]]]  # text -> (ids, char spans)


class TemplateError(ValueError):
    """A chat template that does not compile or raises while rendering; names its file and jinja's message."""


@dataclasses.dataclass(frozen=True)
class TokenizerTemplate:
    """data.chat_template="hf": the tokenizer's own jinja template, resolved once a tokenizer is at hand."""
    name: str = "hf"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; it renders
    its body unchanged, and templates that use it must compile."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' writes plain JSON, and so must we
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class JinjaTemplate:
    """A jinja chat template; `origin` (its file) names it in errors, `variables` are extra render variables
    (e.g. {"enable_thinking": False}), kept as sorted pairs so that equal templates hash alike."""
    source: str
    origin: str
    variables: tuple[tuple[str, object], ...] | Mapping[str, object] = ()

    def __post_init__(self):
        object.__setattr__(self, "variables", tuple(sorted(dict(self.variables).items())))
        try:
            _compile(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template {self.origin} does not compile: {e.message} (line {e.lineno})") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template {self.origin} does not compile: {e.message}") from e

    @classmethod
    def from_file(cls, path: str, **variables) -> "JinjaTemplate":
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            raise FileNotFoundError(f"chat template {path!r} cannot be read ({e.strerror})") from e
        return cls(source, path, variables)

    @property
    def name(self) -> str:
        return self.origin

    def render(self, messages: Sequence[Message | Mapping], add_generation_prompt: bool = False, **kwargs) -> str:
        """The text transformers' apply_chat_template(messages, tokenize=False, ...) gives; kwargs are the special
        tokens (bos_token, ...) and other variables, over this template's own `variables`."""
        dicts = [{"role": m.role, "content": m.content} if isinstance(m, Message) else dict(m) for m in messages]
        variables = {**dict(self.variables), **kwargs}
        try:
            return _compile(self.source).render(messages=dicts, add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **variables)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, an undefined name, ...
            raise TemplateError(f"chat template {self.origin}: {e.message}") from e
        except Exception as e:  # the template is foreign code: name it whatever it raised (TypeError, ...)
            raise TemplateError(f"chat template {self.origin}: {type(e).__name__}: {e}") from e


def content_spans(messages: Sequence[Message], render_text: RenderText, turns: Sequence[int], name: str,
                  where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendering, the (start, end) character span of each message in `turns`), found as the module
    docstring says; DataError naming the template and the message when a content is not in the rendering."""
    full = render_text(messages, False)
    spans, cursor, walked = [], 0, 0
    for i in turns:
        prefix = render_text(messages[:i], True)
        if full.startswith(prefix):
            span = _find(full, messages[i].content, len(prefix))
        else:  # past the contents before it, in order (those the template leaves out are skipped)
            for m in messages[walked:i]:
                found = _find(full, m.content, cursor)
                cursor = found[1] if found else cursor
            span = _find(full, messages[i].content, cursor)
        if span is None:
            raise DataError(f"{where}: chat template {name}: the content of message {i} ({messages[i].role}) is not "
                            f"in its rendering, so its loss mask cannot be derived")
        spans.append(span)
        cursor, walked = span[1], i + 1
    return full, spans


def _find(text: str, content: str, start: int) -> tuple[int, int] | None:
    for candidate in dict.fromkeys((content, content.strip())):
        at = text.find(candidate, start)
        if at >= 0:
            return at, at + len(candidate)
    return None


def learned_tokens(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                   stop_ids: Sequence[int]) -> np.ndarray:
    """Per token 1 where it overlaps a span, or is the stop id right after such tokens; else 0."""
    learned = np.zeros(len(ids), np.int32)
    for span in spans:
        inside, after = _span_tokens(offsets, span)
        learned[inside] = 1
        if after < len(ids) and ids[after] in stop_ids:
            learned[after] = 1
    return learned


def _span_tokens(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(indexes of the tokens overlapping the character span, index of the token after them). An empty token
    span (the first bytes of a character split into bytes, a word marker) belongs to the character it is at."""
    (a, b), offsets = span, np.asarray(offsets, np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    inside = np.flatnonzero(((starts < b) & (ends > a)) | ((starts == ends) & (starts >= a) & (starts < b)))
    return inside, int(inside[-1] + 1 if len(inside) else np.searchsorted(starts, a))


def derive_loss_targets(messages: Sequence[Message], render_text: RenderText, tokenize: Tokenize,
                        stop_ids: Sequence[int], turns: Sequence[int] | None = None, name: str = "template",
                        where: str = "conversation") -> tuple[list[int], np.ndarray]:
    """(ids of the whole rendering, per token 1 where learned) for the assistant messages (or `turns`)."""
    if turns is None:
        turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    text, spans = content_spans(messages, render_text, turns, name, where)
    ids, offsets = tokenize(text)
    return list(ids), learned_tokens(ids, offsets, spans, stop_ids)


class BoundTemplate:
    """A jinja template with a tokenizer: token renderings, derived loss masks, the end-of-turn token."""

    def __init__(self, template: JinjaTemplate, tokenizer):
        self.template, self.tokenizer = template, tokenizer
        self._variables = tokenizer.special_tokens
        try:
            text, (span,) = content_spans(PROBE, self._render, [1], template.name, "a probe conversation")
        except DataError as e:
            raise TemplateError(str(e)) from e
        ids, offsets = tokenizer.encode_with_offsets(text)
        after = _span_tokens(offsets, span)[1]
        follows = ids[after] if after < len(ids) else None
        special = follows is not None and tokenizer.id_to_piece(follows) in tokenizer.reserved_symbols
        self.end_of_turn = follows if special else None  # None: the template ends a turn with plain text
        self.stop_ids = tuple(dict.fromkeys([*([follows] if special else []), *tokenizer.eos_ids]))

    def _render(self, messages, add_generation_prompt):
        return self.template.render(messages, add_generation_prompt, **self._variables)

    def _renderer(self, messages: Sequence[Message], where: str) -> RenderText:
        """The render function for one example: its contents checked, its errors naming `where`."""
        for i, m in enumerate(messages):
            for symbol in self.tokenizer.reserved_symbols:  # encode reads them as control tokens inside text too
                if symbol in m.content:
                    raise DataError(f"{where}: message {i} ({m.role}) contains the reserved chat symbol {symbol!r}")

        def render(messages, add_generation_prompt):
            try:
                return self._render(messages, add_generation_prompt)
            except TemplateError as e:
                raise DataError(f"{where}: {e}") from e
        return render

    def prompt(self, messages: Sequence[Message], where: str) -> list[int]:
        return self.tokenizer.encode(self._renderer(messages, where)(messages, True))

    def conversation(self, messages: Sequence[Message], where: str, turns: Sequence[int] | None = None
                     ) -> tuple[list[int], np.ndarray]:
        return derive_loss_targets(messages, self._renderer(messages, where), self.tokenizer.encode_with_offsets,
                                   self.stop_ids, turns, self.template.name, where)

    def response(self, text: str, where: str) -> list[int]:
        """The answer's tokens and the end-of-turn token after it, as in a conversation."""
        ids, learned = self.conversation((PROBE[0], Message("assistant", text)), where)
        return [i for i, keep in zip(ids, learned) if keep]


@functools.lru_cache(maxsize=16)
def bind(template: JinjaTemplate, tokenizer) -> BoundTemplate:
    """The template bound to the tokenizer, probed once per pair (the stages render thousands of examples)."""
    return BoundTemplate(template, tokenizer)


@functools.lru_cache(maxsize=16)
def tokenizer_template(source: str, origin: str) -> JinjaTemplate:
    return JinjaTemplate(source, origin)
