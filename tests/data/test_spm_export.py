"""Tokenizer files of a Hugging Face export (data/spm_export.py): a sentencepiece model as tokenizer.json with its
ids on the default corpus and on hard texts (with and without bos), its decoding, the differences that cannot be
removed (each shown, with its cause), chatml_min as jinja, and an imported tokenizer's files written back unchanged.

Two models: `corpus_tok` as the pipeline trains one (default corpus, 512 pieces), and `rich_tok`, trained with
accented, CJK, emoji, digit and indented lines besides, so that those characters and runs of spaces have pieces."""
import json
import os
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from llm_jax.data import chat, default_corpus
from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.data.records import Message
from llm_jax.data.spm_export import builtin_jinja, to_hf_tokenizer, write_tokenizer_files
from llm_jax.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "hf" / "fixtures"
DOCS = [t for t, _ in default_corpus.generate_documents(3000)]
EXTRA = ["Héllo wörld, café naïve. Привет, мир! 你好，世界。日本語のテキスト 1234567 and 3.14159.\n\n  indented\ttab",
         "def f(x):\n    return x  # four spaces\n        deeper\n", "Ünïcödé àéîõü çñ ß œ æ ø å", "数字 12 345 6789 ０１２",
         "    code   block    with     runs of spaces", "emoji 🎉🚀 ok 👍🏽", "x<0 and y>0, a<b>c </div>"]
HARD_TEXTS = [
    "", " ", "   ", "  leading", "trailing  ", "a    b     c", "        eight spaces of indent", "\t", "\ttab\t\tx",
    "\n", "\n\n", "line\nbreak", "para\n\nbreak\n", "\n\nopening newlines", " \n \n", "\r\nwindows\r\n",
    "café naïve Ünïcödé ß", "日本語のテキスト，你好。", "emoji 🎉🚀 👍🏽 👩‍💻 🇫🇷", "1234567 3.14159 0x1F 0１２",
    "x <|user|> y<|end|>z", "<|assistant|> opens, <|system|>\n<|end|>", "<|end|><|end|>", "a<|user|>",
    "<0x41> and <0x0A>, <0x3C>x", "▁word ▁", "\u00a0nbsp\u3000ideographic", "x<0 and y>0, a<b>c </div>",
    "Hello, world!\n\n  indented\ttab\r\nend  " * 3]
CONVERSATIONS = [
    (Message("system", "Be brief."), Message("user", "What is 2+2?"), Message("assistant", "It is 4.")),
    (Message("user", " leading and trailing "), Message("assistant", "\nopens with a newline"),
     Message("user", ""), Message("assistant", "two  spaces\n\nand café 日本 🎉")),
    (Message("user", "\n"), Message("assistant", " ")),
]


@pytest.fixture(scope="module")
def corpus_tok(tmp_path_factory):
    return train_tokenizer(DOCS[:1500], str(tmp_path_factory.mktemp("spm") / "corpus.model"), vocab_size=512)


@pytest.fixture(scope="module")
def rich_tok(tmp_path_factory):
    return train_tokenizer(DOCS[:600] + EXTRA * 80, str(tmp_path_factory.mktemp("spm") / "rich.model"),
                           vocab_size=700)


@pytest.fixture(scope="module", params=["corpus", "rich"])
def exported(request, tmp_path_factory):
    """(sentencepiece Tokenizer, the directory write_tokenizer_files wrote, its tokenizers.Tokenizer)."""
    tok = request.getfixturevalue(f"{request.param}_tok")
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    names = write_tokenizer_files(tok, "chatml_min", str(out))
    assert sorted(names) == sorted(os.listdir(out)) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"])
    return tok, out, tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))


def _encode(hf, texts, specials=False):
    return [e.ids for e in hf.encode_batch_fast(list(texts), add_special_tokens=specials)]


def test_ids_match_sentencepiece_on_the_default_corpus(corpus_tok, tmp_path):
    hf = to_hf_tokenizer(corpus_tok)
    lines = [line for doc in DOCS for line in doc.split("\n")]
    for texts in (DOCS, lines):  # documents (1500 seen in training, 1500 not) and each of their lines alone
        want = corpus_tok.encode_batch(texts)
        got = _encode(hf, texts)
        assert [t for t, a, b in zip(texts, want, got) if a != b] == []
        assert _encode(hf, texts[:500], specials=True) == [[corpus_tok.bos_id, *ids] for ids in want[:500]]
    assert sum(map(len, want)) > 100_000


def test_ids_match_sentencepiece_on_hard_texts(exported):
    """The same ids, but where a run of spaces ties (test_runs_of_spaces_tie_and_float32_breaks_the_ties): the same
    pieces in another order. None of these texts does with these two models."""
    tok, out, hf = exported
    want, got = tok.encode_batch(HARD_TEXTS), _encode(hf, HARD_TEXTS)
    differ = [(t, a, b) for t, a, b in zip(HARD_TEXTS, want, got) if a != b]
    assert [t for t, a, b in differ if sorted(a) != sorted(b) or "  " not in t] == []
    assert len(differ) == 0
    assert sum(map(len, want)) > 250
    assert _encode(hf, HARD_TEXTS, specials=True) == [[tok.bos_id, *ids] for ids in got]
    loaded = HFTokenizer.load(str(out))  # as a later stage reads the exported files
    assert [loaded.encode(t) for t in HARD_TEXTS] == got
    assert [loaded.encode_with_specials(t) for t in HARD_TEXTS] == [[tok.bos_id, *ids] for ids in got]
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id, loaded.add_bos) == (2, 3, 0, 1, True)
    assert loaded.vocab_size == tok.vocab_size
    assert set(SPECIAL_TOKENS) <= set(loaded.reserved_symbols)  # with <pad> <unk> <s> </s>: special added tokens
    assert [loaded.special_id(s) for s in SPECIAL_TOKENS] == [tok.special_id(s) for s in SPECIAL_TOKENS]


def test_byte_fallback_and_literal_byte_pieces(rich_tok):
    hf = to_hf_tokenizer(rich_tok)
    for text in ("🎉", "ไทย", "<0x41>", " <0xF0><0x9F>"):  # unknown characters as bytes; "<0x41>" spelled out
        assert hf.encode(text, add_special_tokens=False).ids == rich_tok.encode(text)
    assert [rich_tok.id_to_piece(i) for i in rich_tok.encode("ไ")] == ["▁", "<0xE0>", "<0xB9>", "<0x84>"]
    assert rich_tok.id_to_piece(rich_tok.encode("<0x41>")[1]) == "<"


def test_decoding_gives_back_the_text(exported):
    tok, out, hf = exported
    texts = HARD_TEXTS + DOCS[:300]
    ids = tok.encode_batch(texts)
    decoded = [hf.decode(i, skip_special_tokens=False) for i in ids]
    assert decoded == [tok.decode(i) for i in ids]
    assert [d for d, t in zip(decoded, texts) if d != t] == ["▁word ▁".replace("▁", " ")]  # as sentencepiece
    plain = range(len(HARD_TEXTS), len(texts))  # no chat symbols, which skip_special_tokens drops too
    assert [hf.decode([tok.bos_id, *ids[i], tok.eos_id], skip_special_tokens=True) for i in plain] == [
        tok.decode([tok.bos_id, *ids[i], tok.eos_id]) for i in plain]
    loaded = HFTokenizer.load(str(out))
    assert [loaded.decode(i) for i in ids] == decoded


# ---- what differs, and why ------------------------------------------------------------------------------------

def test_a_text_that_is_exactly_a_chat_symbol_has_no_word_marker(exported):
    """Added tokens are matched in normalized form, so the normalizer cannot give "<|user|>" alone a dummy prefix
    without giving it to every "<|user|>" in a text; sentencepiece opens it with "▁" as any text."""
    tok, _, hf = exported
    space = tok.encode(" ")[0]
    for symbol in SPECIAL_TOKENS:
        assert tok.encode(symbol) == [space, tok.special_id(symbol)]
        assert hf.encode(symbol, add_special_tokens=False).ids == [tok.special_id(symbol)]
        longer = symbol + "x"  # any longer text is encoded as sentencepiece does
        assert hf.encode(longer, add_special_tokens=False).ids == tok.encode(longer)


def test_control_tokens_spelled_in_text_are_read_as_control_tokens(exported):
    """transformers reads special tokens in text (a chat template writes bos_token and eos_token as text);
    sentencepiece never matches control pieces and spells them out."""
    tok, _, hf = exported
    for text, ours in (("<s>", [2]), ("a</s>", tok.encode("a") + [3]), ("<pad> <unk>", [0, tok.encode(" ")[0], 1])):
        assert hf.encode(text, add_special_tokens=False).ids == ours
        assert not set(tok.encode(text)) & {0, 1, 2, 3}


def _viterbi(text, pieces, dtype):
    """sentencepiece's segmentation (unigram_model.cc, EncodeOptimized: left to right, a best path replaced only by
    a strictly better one) with the path scores added in `dtype`; pieces: {piece: (id, float32 score)}."""
    best = [(dtype(0), 0, -1)] + [None] * len(text)
    for start in range(len(text)):
        for end in range(start + 1, len(text) + 1):
            if text[start:end] in pieces:
                piece_id, score = pieces[text[start:end]]
                candidate = dtype(best[start][0] + dtype(score))
                if best[end] is None or candidate > best[end][0]:
                    best[end] = (candidate, start, piece_id)
    ids, end = [], len(text)
    while end > 0:
        _, end, piece_id = best[end]
        ids.append(piece_id)
    return ids[::-1]


def test_runs_of_spaces_tie_and_float32_breaks_the_ties(rich_tok):
    """With whitespace-only pieces ("▁", "▁▁▁▁") a run of spaces has segmentations that are the same pieces in another
    order, so exactly the same score. sentencepiece adds path scores in float32, whose rounding picks one of them;
    `tokenizers` adds them in float64 (exact here) and keeps the first. Both follow the same Viterbi, so this
    cannot be matched with any scores: such texts get the same pieces, in another order."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(rich_tok.path).read_bytes())
    pieces = {p.piece: (i, p.score) for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    assert {"▁", "▁▁▁▁", "▁▁▁▁▁"} <= set(pieces) and all(c in pieces for c in "athex.")
    hf = to_hf_tokenizer(rich_tok)
    texts = [prefix + " " * n for prefix in ("", "a", "the", "x.") for n in range(1, 41)]
    differ = 0
    for text, want, got in zip(texts, rich_tok.encode_batch(texts), _encode(hf, texts)):
        normalized = "▁" + text.replace(" ", "▁")
        assert _viterbi(normalized, pieces, np.float32) == want
        assert _viterbi(normalized, pieces, np.float64) == got
        if want != got:
            differ += 1
            assert sorted(want) == sorted(got)  # the same pieces, so exactly the same score
    assert differ > 0  # 38 of the 160 with sentencepiece 0.2.3 and tokenizers 0.23.3


# ---- chat template ----------------------------------------------------------------------------------------------

def _render(source, messages, add_generation_prompt, tok):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt, **tok.special_tokens)


def test_chat_template_renders_chatml_min_tokens(exported):
    tok, out, hf = exported
    source = (out / "chat_template.jinja").read_text()
    for messages in CONVERSATIONS:
        tokens, _ = chat.render_conversation(messages, tok)
        text = _render(source, messages, False, tok)
        assert hf.encode(text, add_special_tokens=False).ids == tokens.tolist()
        prompt = _render(source, messages[:-1], True, tok)
        assert hf.encode(prompt, add_special_tokens=False).ids == chat.render_prompt(messages[:-1], tok).tolist()
    assert _render(source, CONVERSATIONS[0], False, tok) == (
        "<s><|system|> Be brief.<|end|><|user|> What is 2+2?<|end|><|assistant|> It is 4.<|end|></s>")


def test_exported_files_give_the_same_sft_and_preference_data(exported):
    """A run importing the export with data.chat_template="hf" renders the tokens the sentencepiece run trained on.
    chat_template.py derives the loss mask from character spans, and an answer's opening "▁" piece standing alone
    (the answer starts with "\\n", or a character with no "▁x" piece) spans the template's space before the content:
    that one target is not learned there, where chatml_min learns it. (An answer of spaces only, CONVERSATIONS[2],
    is found at the template's space, so its mask is off by one token; it is left out here.)"""
    tok, out, _ = exported
    loaded = HFTokenizer.load(str(out))
    space, assistant = tok.encode(" ")[0], tok.special_id("<|assistant|>")

    def unlearned(tokens, mask, want_tokens, want_mask):  # the targets learned by chatml_min only
        np.testing.assert_array_equal(tokens, want_tokens)
        differ = np.flatnonzero(mask != want_mask)
        assert all(tokens[i] == assistant and tokens[i + 1] == space and mask[i] == 0 for i in differ)
        return len(differ)

    n = 0
    for messages in CONVERSATIONS[:2]:
        n += unlearned(*chat.render_conversation(messages, loaded, "hf"), *chat.render_conversation(messages, tok))
        np.testing.assert_array_equal(chat.render_prompt(messages[:-1], loaded, "hf"),
                                      chat.render_prompt(messages[:-1], tok))
    assert n >= 1  # "\nopens with a newline" in CONVERSATIONS[1]
    assert chat.stop_ids(loaded, "hf") == chat.stop_ids(tok)
    pair = chat.render_pair(CONVERSATIONS[0][:-1], "Four.", "\nIt is 5.", loaded, "hf")
    want = chat.render_pair(CONVERSATIONS[0][:-1], "Four.", "\nIt is 5.", tok)
    np.testing.assert_array_equal(pair.prompt, want.prompt)
    assert unlearned(pair.chosen, pair.chosen_mask, want.chosen, want.chosen_mask) <= 1
    assert unlearned(pair.rejected, pair.rejected_mask, want.rejected, want.rejected_mask) == 1


def test_tokenizer_config(exported):
    tok, out, _ = exported
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token",
                                   "add_bos_token", "add_eos_token", "additional_special_tokens")} == dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=True, add_eos_token=False, additional_special_tokens=list(SPECIAL_TOKENS))
    assert [config["added_tokens_decoder"][str(i)]["content"] for i in range(8)] == [
        "<pad>", "<unk>", "<s>", "</s>", *SPECIAL_TOKENS]
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    assert special_map == {**tok.special_tokens, "additional_special_tokens": list(SPECIAL_TOKENS)}
    written = write_tokenizer_files(tok, "chatml_min", str(out), model_max_length=2048)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 2048
    assert len(written) == 4


def test_unsupported_models_and_templates_fail_naming_them(tmp_path):
    bpe = train_tokenizer(DOCS[:100], str(tmp_path / "bpe.model"), vocab_size=400, model_type="bpe")
    with pytest.raises(ValueError, match="bpe.model has trainer_spec.model_type=2"):
        write_tokenizer_files(bpe, "chatml_min", str(tmp_path))
    unigram = train_tokenizer(DOCS[:100], str(tmp_path / "u.model"), vocab_size=400)
    with pytest.raises(ValueError, match="names the tokenizer's own template"):
        write_tokenizer_files(unigram, "hf", str(tmp_path))
    with pytest.raises(TypeError, match="cannot export tokenizer"):
        write_tokenizer_files(object(), "hf", str(tmp_path))


# ---- an imported (Hugging Face) tokenizer ------------------------------------------------------------------------

def test_an_imported_tokenizer_is_written_back_unchanged(tmp_path):
    source = FIXTURES / "mistral"
    tok = HFTokenizer.load(str(source))
    out = tmp_path / "hf"
    out.mkdir()
    names = write_tokenizer_files(tok, "hf", str(out))
    assert sorted(names) == sorted(os.listdir(out)) == ["chat_template.jinja", "tokenizer.json",
                                                        "tokenizer_config.json"]
    for name in names:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert HFTokenizer.load(str(out)).sha256 != tok.sha256  # generation_config.json stays with the export's own

    template = tmp_path / "mine.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }}{% endfor %}")
    other = tmp_path / "other"
    other.mkdir()
    assert sorted(write_tokenizer_files(tok, str(template), str(other))) == sorted(names)
    assert (other / "chat_template.jinja").read_bytes() == template.read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="no special symbol '<\\|system\\|>'"):
        write_tokenizer_files(tok, "chatml_min", str(tmp_path))


def test_builtin_template_on_an_imported_tokenizer(exported, tmp_path):
    """A run that imported an exported checkpoint and trains with data.chat_template="chatml_min" exports it as the
    same jinja (the content prefix " " found by probing the tokenizer)."""
    tok, out, _ = exported
    loaded = HFTokenizer.load(str(out))
    again = tmp_path / "again"
    again.mkdir()
    names = write_tokenizer_files(loaded, "chatml_min", str(again))
    assert sorted(names) == sorted(os.listdir(out))
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert (out / "chat_template.jinja").read_text() == builtin_jinja(chat.TEMPLATES["chatml_min"], " ")
