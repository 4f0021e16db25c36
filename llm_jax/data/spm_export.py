"""A run's tokenizer as Hugging Face files, for `export_hf`: `write_tokenizer_files(tokenizer, template, out_dir)`.

An imported checkpoint's `HFTokenizer` is written back byte for byte (its generation_config.json excepted: the
export writes its own, with every stop id); a template other than "hf" becomes chat_template.jinja, which
transformers reads before tokenizer_config.json's "chat_template".

A sentencepiece `Tokenizer` trained here becomes a `tokenizers` pipeline that gives its ids (`to_hf_tokenizer`):

    added tokens    <pad> <unk> <s> </s> and the chat symbols (<|user|>, ...), all special: matched anywhere in
                    the text, after normalization (see below)
    normalizer      one "▁" opening the text (sentencepiece's dummy prefix), then every " " as "▁"
    pre-tokenizer   other user-defined pieces ("\\n") isolated; a literal "<0xNN>" cut after its "<"
    model           Unigram over all pieces in id order, sentencepiece's scores, byte fallback
    post-processor  <s> first (transformers' add_special_tokens=True); decoder: "▁" as " ", bytes as UTF-8, one
                    leading space dropped, as sentencepiece decodes

Why not the Metaspace pre-tokenizer: it prepends its "▁" only to a text that does not already start with one, so
" a" would be "▁a" where sentencepiece has "▁▁a"; and it sees the pieces between added tokens apart, so a text
opening with "\\n" or a chat symbol would lose the "▁" sentencepiece puts before it. The normalizer sees the whole
text (every added token is `normalized`, so it is found after normalization). The prefix is not added where the
text opens with a control token, so that a chat template's rendering "<s><|user|> Hi..." has no "▁" before <s>.
Added tokens are found in their normalized form, so no prefix is added to a text that is exactly one of them either.

Why the pre-tokenizer: in sentencepiece, user-defined pieces always win the Viterbi and byte pieces are never
matched in text. "\\n" is isolated as a user-defined piece is, but by the pre-tokenizer rather than as an added
token: an added token is matched in its normalized form, so a text that is exactly "\\n" would lose its "▁". The
Unigram model matches every piece of its vocabulary, scores do not keep one out (an unknown character costs the
lowest score less 10, so a byte piece of any score beats a literal "<0x3C>" whose "<" is unknown); the cut after
"<" keeps them out, at a boundary no learned piece crosses (checked). Pieces sentencepiece never matches get the
lowest learned score, so the Unigram's unknown-character score is sentencepiece's.

What differs from `Tokenizer.encode` (tests/data/test_spm_export.py):
- a text that is exactly one chat symbol ("<|user|>"): [<|user|>] where sentencepiece has [▁, <|user|>];
- literal control tokens in text ("<s>", "</s>", "<pad>", "<unk>"): read as those tokens, as transformers reads
  special tokens (a chat template writes bos_token and eos_token as text); sentencepiece spells them out;
- exact ties: segmentations that are the same pieces in another order have the same score (a run of spaces once
  whitespace-only pieces such as "▁▁▁▁" are learned; a run of any repeated piece). sentencepiece adds path scores
  in float32 and the rounding picks one; `tokenizers` adds them in float64 and keeps the first: the same pieces,
  in another order. No choice of scores changes that (none on the default corpus, which has no such runs).

The chat template: a built-in template (chat.TEMPLATES) as jinja whose rendering tokenizes to exactly what
chat.render_conversation / render_prompt give: bos_token, each turn as its markers, " " + content (the space
becomes the "▁" that content encoded on its own opens with; nothing for empty content), the end symbol, then
eos_token, or the assistant's markers with add_generation_prompt.
"""
from __future__ import annotations

import json
import os

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from llm_jax.data import chat
from llm_jax.data.chat_template import JinjaTemplate, TokenizerTemplate
from llm_jax.data.hf_tokenizer import FILES as HF_FILES
from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.data.tokenizer import Tokenizer

SPACE = "▁"  # sentencepiece's word marker (U+2581)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
NOT_COPIED = ("generation_config.json",)  # a model file: export_hf writes its own, with every stop id
NO_MAX_LENGTH = int(1e30)  # what transformers writes when a tokenizer names no model_max_length
_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


def write_tokenizer_files(tokenizer, template, out_dir: str, model_max_length: int | None = None) -> list[str]:
    """Writes the tokenizer files of `tokenizer` (module docstring) and `template` ("hf", a built-in name, a .jinja
    path) into out_dir; returns the names written. `model_max_length` goes into a sentencepiece tokenizer's
    tokenizer_config.json (transformers' "no limit" when None); an imported tokenizer keeps its own."""
    if isinstance(tokenizer, HFTokenizer):
        return _write_hf(tokenizer, template, out_dir)
    if isinstance(tokenizer, Tokenizer):
        return _write_spm(tokenizer, template, out_dir, model_max_length)
    raise TypeError(f"cannot export tokenizer {tokenizer!r}: expected a sentencepiece Tokenizer or an HFTokenizer")


def _write_hf(tokenizer: HFTokenizer, template, out_dir: str) -> list[str]:
    if HFTokenizer.load(tokenizer.path).sha256 != tokenizer.sha256:
        raise ValueError(f"tokenizer directory {tokenizer.path} changed since the run loaded it")
    written = {}
    for name in HF_FILES:
        if name not in NOT_COPIED and os.path.isfile(os.path.join(tokenizer.path, name)):
            with open(os.path.join(tokenizer.path, name), "rb") as f:
                written[name] = f.read()
    t = chat.get_template(template)
    if not isinstance(t, TokenizerTemplate):
        written[CHAT_TEMPLATE_FILE] = _template_source(t, tokenizer).encode("utf-8")
    for name, data in written.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    return list(written)


def _write_spm(tokenizer: Tokenizer, template, out_dir: str, model_max_length: int | None) -> list[str]:
    t = chat.get_template(template)
    if isinstance(t, TokenizerTemplate):
        raise ValueError(f"data.chat_template={template!r} names the tokenizer's own template, but sentencepiece "
                         f"tokenizer {tokenizer.path} has none")
    specials = tokenizer.special_tokens
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast", **specials, add_bos_token=True, add_eos_token=False,
        model_max_length=NO_MAX_LENGTH if model_max_length is None else int(model_max_length),
        clean_up_tokenization_spaces=False,  # it would remove spaces before punctuation: decode must give the text
        additional_special_tokens=list(tokenizer.reserved_symbols))  # transformers 5 reads it as extra_special_tokens
    hf = to_hf_tokenizer(tokenizer)
    config["added_tokens_decoder"] = {str(i): _added_token_dict(token) for i, token in
                                      sorted(hf.get_added_tokens_decoder().items())}
    special_map = dict(specials, additional_special_tokens=list(tokenizer.reserved_symbols))
    files = {"tokenizer.json": hf.to_str(pretty=True), "tokenizer_config.json": _json(config),
             "special_tokens_map.json": _json(special_map), CHAT_TEMPLATE_FILE: _template_source(t, tokenizer)}
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return list(files)


def _json(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _added_token_dict(token: AddedToken) -> dict:
    return dict(content=token.content, lstrip=token.lstrip, normalized=token.normalized, rstrip=token.rstrip,
                single_word=token.single_word, special=token.special)


def to_hf_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline that gives `tokenizer.encode`'s ids (module docstring); ValueError naming the
    model file and the setting for a model it cannot reproduce."""
    proto = _model_proto(tokenizer)
    pieces = list(proto.pieces)
    learned = [p for p in pieces if p.type == _Piece.NORMAL]
    lowest = min(p.score for p in learned)
    vocab = [(p.piece, p.score if p.type == _Piece.NORMAL else lowest) for p in pieces]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=tokenizer.unk_id, byte_fallback=True))

    reserved = set(tokenizer.reserved_symbols)
    controls = [p.piece for p in pieces if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)]
    symbols = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED and p.piece in reserved]
    isolated = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED and p.piece not in reserved]

    steps = []
    if proto.normalizer_spec.add_dummy_prefix:
        # the prefix opens every text but one that starts with a control token or is exactly an added token
        opens = "".join(f"(?!{_onig_literal(s)})" for s in controls)
        whole = "".join(f"(?!{_onig_literal(s)}\\z)" for s in controls + symbols)
        steps.append(normalizers.Replace(Regex(rf"\A{opens}{whole}"), SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)

    splits = [pre_tokenizers.Split(Regex(_byte_piece_cut(learned, tokenizer.path)), behavior="merged_with_previous")]
    if isolated:  # longest first: sentencepiece matches the longest user-defined piece
        alternatives = "|".join(_onig_literal(s) for s in sorted(isolated, key=len, reverse=True))
        splits.insert(0, pre_tokenizers.Split(Regex(alternatives), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)

    # normalized: found in the normalized text, so the dummy prefix is decided on the whole text (docstring)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=True) for s in controls + symbols])
    bos = tokenizer.special_tokens["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _model_proto(tokenizer: Tokenizer):
    """The model file's ModelProto, checked against what to_hf_tokenizer reproduces."""
    with open(tokenizer.path, "rb") as f:
        data = f.read()
    if Tokenizer(data, tokenizer.path).sha256 != tokenizer.sha256:
        raise ValueError(f"sentencepiece model {tokenizer.path} changed since the run loaded it")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = [
        ("trainer_spec.model_type", spec.model_type, spec.model_type == spec.UNIGRAM),
        ("trainer_spec.byte_fallback", spec.byte_fallback, spec.byte_fallback),
        ("trainer_spec.treat_whitespace_as_suffix", spec.treat_whitespace_as_suffix,
         not spec.treat_whitespace_as_suffix),
        ("normalizer_spec.name", norm.name, norm.name == "identity" and not norm.precompiled_charsmap),
        ("normalizer_spec.remove_extra_whitespaces", norm.remove_extra_whitespaces, not norm.remove_extra_whitespaces),
        ("unused pieces", sum(p.type == _Piece.UNUSED for p in proto.pieces),
         not any(p.type == _Piece.UNUSED for p in proto.pieces)),
    ]
    for field, value, ok in unsupported:
        if not ok:
            raise ValueError(f"sentencepiece model {tokenizer.path} has {field}={value!r}, which the Hugging Face "
                             f"export does not reproduce (it expects a unigram model as train_tokenizer makes)")
    return proto


def _onig_literal(text: str) -> str:
    """text as a literal of the regex engine of `tokenizers` (Oniguruma), every non-alphanumeric escaped."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def _byte_piece_cut(learned, path: str) -> str:
    """A pattern whose match, merged with what precedes it, cuts every literal "<0xNN>" in two at a boundary no
    learned piece crosses (two characters of it side by side in no piece)."""
    hex_ = "[0-9A-F]"
    parts = ["<", "0", "x", hex_, hex_, ">"]
    hexdigits = "0123456789ABCDEF"
    for k in (1, 5, 2, 3, 4):  # cut after parts[k - 1]
        left = "<0x"[k - 1] if k <= 3 else hexdigits
        right = "0x"[k - 1] if k <= 2 else (hexdigits if k < 5 else ">")
        if not any(a + b in p.piece for p in learned for a in left for b in right):
            behind = "".join(parts[:k - 1])
            ahead = "".join(parts[k:])
            return f"{f'(?<={behind})' if behind else ''}{parts[k - 1]}(?={ahead})"
    raise ValueError(f"sentencepiece model {path}: every boundary inside a byte piece <0xNN> is crossed by a "
                     f"learned piece, so a literal one in text cannot be kept from matching it")


def _template_source(template, tokenizer) -> str:
    """The jinja source of a template: a .jinja file's own, or a built-in one written as jinja."""
    if isinstance(template, JinjaTemplate):
        return template.source
    return builtin_jinja(template, _content_prefix(template, tokenizer))


def _content_prefix(template: chat.ChatTemplate, tokenizer) -> str:
    """What goes between a marker and the content for the rendering to tokenize as the content encoded on its
    own: " " for a tokenizer whose encode opens with a word marker ("▁"), "" for one that does not."""
    if isinstance(tokenizer, Tokenizer):
        return " "
    end_id = chat.check_template(tokenizer, template)[template.end]  # ValueError naming a missing symbol
    probes = ("Hello world", " two  spaces", "\nnew line")

    def after_end(text):  # the ids after the end symbol (a dummy prefix may come before it)
        ids = tokenizer.encode(text)
        return ids[ids.index(end_id) + 1:] if end_id in ids else None

    for prefix in ("", " "):
        if all(after_end(template.end + prefix + p) == tokenizer.encode(p) for p in probes):
            return prefix
    raise ValueError(f"chat template {template.name!r} cannot be written as jinja for tokenizer {tokenizer.path}: "
                     f"no text between {template.end!r} and a message tokenizes as the message encoded on its own")


def builtin_jinja(template: chat.ChatTemplate, content_prefix: str = " ") -> str:
    """A built-in template as jinja (module docstring), rendered with transformers' bos_token and eos_token."""
    def lit(text):
        return json.dumps(text)  # a jinja string literal: the same escapes as JSON's

    markers = ", ".join(f"{lit(role)}: {lit(''.join(symbols))}" for role, symbols in template.markers.items())
    no_role = lit(f"chat template {template.name} has no role ")
    return "".join([
        f"{{#- {template.name}: bos, (markers content end)*, eos; or markers of {chat.LEARNED_ROLE!r} last -#}}\n",
        f"{{%- set markers = {{{markers}}} -%}}\n",
        "{{- bos_token -}}\n",
        "{%- for message in messages -%}\n",
        "    {%- if message['role'] not in markers -%}\n",
        f"        {{{{- raise_exception({no_role} + message['role']) -}}}}\n",
        "    {%- endif -%}\n",
        "    {{- markers[message['role']] -}}\n",
        "    {%- if message['content'] -%}\n",
        f"        {{{{- {lit(content_prefix)} + message['content'] -}}}}\n",
        "    {%- endif -%}\n",
        f"    {{{{- {lit(template.end)} -}}}}\n",
        "{%- endfor -%}\n",
        "{%- if add_generation_prompt -%}\n",
        f"    {{{{- markers[{lit(chat.LEARNED_ROLE)}] -}}}}\n",
        "{%- else -%}\n",
        "    {{- eos_token -}}\n",
        "{%- endif -%}\n",
    ])
