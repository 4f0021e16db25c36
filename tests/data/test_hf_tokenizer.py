"""Hugging Face tokenizers: small ones built here (byte-level BPE like Llama 3 / Qwen, sentencepiece-style BPE with
byte fallback like Mistral / Gemma), the files a run keeps, bad input, and parity with transformers on the
committed fixtures (tests/hf/fixtures/<family>/reference.json, made by tests/hf/make_fixtures.py)."""
import json
import os
from pathlib import Path

import ml_collections
import pytest
from tokenizers import AddedToken, Regex, Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llm_jax.data import default_corpus
from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.data.tokenizer import Tokenizer, check_vocab, train_tokenizer
from llm_jax.data.tokenizer_files import load_tokenizer, run_tokenizer_path

FIXTURES = Path(__file__).resolve().parents[1] / "hf" / "fixtures"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
CORPUS = [t for t, _ in default_corpus.generate_documents(60)] + [
    "Héllo wörld, café naïve. Привет, мир! 你好，世界。 1234567 and 3.14159.\n\n  indented\ttab"] * 3
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer split
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
TEXT = "Héllo wörld! <|eot_id|> Привет 日本 12345,  two  spaces\n\nnew line"


def _special(content):
    return AddedToken(content, special=True, normalized=False)


def byte_level_bpe(specials, bos=None, vocab_size=400):
    """A byte-level BPE as Llama 3 and Qwen have it: split regex, bytes to unicode, specials added after training;
    with `bos`, a post-processor that opens every encoding with it (Llama 3), else none (Qwen)."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([_special(s) for s in specials])
    byte_level = processors.ByteLevel(trim_offsets=True)  # trimmed spans: encode_with_offsets must undo that
    if bos is None:
        tok.post_processor = byte_level
    else:
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


def metaspace_bpe(specials=MISTRAL_SPECIALS, n_pieces=300):
    """A sentencepiece-converted BPE as Mistral has it: control tokens, then the 256 <0xNN> byte tokens, then the
    pieces; a "▁" word marker on the first word; unknown characters fall back to bytes; <s> opens an encoding."""
    trainer_tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False,
                                                                limit_alphabet=80))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([_special(s) for s in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return tok


def write_dir(path, tok, config, generation=None, template_file=None):
    """A tokenizer directory as save_pretrained writes it."""
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if generation is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation, f)
    if template_file is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template_file)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    tok = byte_level_bpe(LLAMA_SPECIALS, bos="<|begin_of_text|>")
    ids = {s: tok.token_to_id(s) for s in LLAMA_SPECIALS}
    return write_dir(tmp_path_factory.mktemp("llama"), tok,
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
                      "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"},
                     generation={"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]})


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("qwen"), byte_level_bpe(QWEN_SPECIALS),
                     {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                      "chat_template": "ignored: chat_template.jinja comes first"},
                     template_file="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                   "{% endfor %}")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("mistral"), metaspace_bpe(),
                     {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                      "chat_template": [{"name": "tool_use", "template": "tools"},
                                        {"name": "default", "template": "{{ bos_token }}default"}]})


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("sp") / "tokenizer.model"), vocab_size=400).path


def test_byte_level_with_bos_like_llama3(llama_dir):
    tok = HFTokenizer.load(llama_dir)
    rust = RustTokenizer.from_file(os.path.join(llama_dir, "tokenizer.json"))
    ids = tok.encode(TEXT)
    assert ids == rust.encode(TEXT, add_special_tokens=False).ids
    assert tok.special_id("<|eot_id|>") in ids  # a special token spelled in text is read as its id, as HF does
    assert tok.encode_with_specials(TEXT) == [tok.bos_id, *ids] and tok.add_bos
    assert tok.decode(ids) == TEXT  # special tokens kept, bytes round-trip
    assert tok.encode_batch([TEXT, "a b"]) == [ids, tok.encode("a b")]
    assert tok.bos_id == tok.special_id("<|begin_of_text|>") and tok.pad_id is None and tok.unk_id is None
    assert tok.eos_id == tok.special_id("<|end_of_text|>")
    assert tok.eos_ids == (tok.eos_id, tok.special_id("<|eot_id|>"))  # generation_config adds <|eot_id|>
    assert tok.vocab_size == rust.get_vocab_size(with_added_tokens=True) == 400 + len(LLAMA_SPECIALS)
    assert tok.id_to_piece(tok.bos_id) == "<|begin_of_text|>"
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    assert set(tok.reserved_symbols) == set(LLAMA_SPECIALS)
    assert tok.chat_template.startswith("{{ bos_token }}")
    with pytest.raises(KeyError, match="'Hé' is not a special symbol of tokenizer"):
        tok.special_id("Hé")
    with pytest.raises(IndexError, match=f"id 100000 is outside the vocabulary of tokenizer {llama_dir}"):
        tok.id_to_piece(100000)
    assert repr(tok) == f"HFTokenizer({llama_dir!r}, vocab_size={tok.vocab_size}, sha256={tok.sha256[:12]})"


def test_offsets_cover_each_token_untrimmed(llama_dir, mistral_dir, sp_path):
    for tok in (HFTokenizer.load(llama_dir), HFTokenizer.load(mistral_dir), Tokenizer.load(sp_path)):
        text = "A  b\n\nçé 日 <|eot_id|>" if isinstance(tok, HFTokenizer) else "A  b\n\nçé 日 <|user|>"
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text) and len(offsets) == len(ids)
        # every character is covered, in order; a space token keeps its span (the post-processor would trim it)
        covered = {i for s, e in offsets for i in range(s, e)}
        assert covered == set(range(len(text))) and [s for s, _ in offsets] == sorted(s for s, _ in offsets)


def test_byte_level_without_bos_like_qwen(qwen_dir):
    tok = HFTokenizer.load(qwen_dir)
    assert tok.bos_id is None and not tok.add_bos and tok.encode_with_specials("Hello") == tok.encode("Hello")
    assert tok.eos_ids == (tok.special_id("<|im_end|>"),) and tok.pad_id == tok.special_id("<|endoftext|>")
    assert tok.chat_template.startswith("{% for m in messages %}")  # chat_template.jinja over tokenizer_config
    assert tok.chat_template_origin == os.path.join(qwen_dir, "chat_template.jinja")


def test_byte_fallback_like_mistral(mistral_dir):
    tok = HFTokenizer.load(mistral_dir)
    text = "Hello world 日本 ☃"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.unk_id not in ids  # unknown characters become their bytes
    assert tok.id_to_piece(ids[-1]) == "<0x83>"  # ☃ = E2 98 83
    assert tok.encode_with_specials(text) == [tok.special_id("<s>"), *ids] and tok.add_bos
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.chat_template == "{{ bos_token }}default"  # the "default" entry of a list of named templates


def test_sentencepiece_has_the_new_members(sp_path):
    tok = Tokenizer.load(sp_path)
    assert tok.add_bos and tok.eos_ids == (tok.eos_id,) and tok.chat_template is None
    assert tok.encode_with_specials("hi") == [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    assert tok.special_tokens["eos_token"] == "</s>"


def test_sha256_is_of_the_files(llama_dir, tmp_path):
    a, b = HFTokenizer.load(llama_dir), HFTokenizer.load(llama_dir)
    assert a.sha256 == b.sha256
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(llama_dir):
        (copy / name).write_bytes(Path(llama_dir, name).read_bytes())
    assert HFTokenizer.load(str(copy)).sha256 == a.sha256
    (copy / "generation_config.json").write_text('{"eos_token_id": 1}')
    assert HFTokenizer.load(str(copy)).sha256 != a.sha256


def test_load_tokenizer_and_run_directories(llama_dir, sp_path, tmp_path):
    assert isinstance(load_tokenizer(sp_path), Tokenizer)
    assert isinstance(load_tokenizer(llama_dir), HFTokenizer)
    assert isinstance(load_tokenizer(os.path.join(llama_dir, "tokenizer.json")), HFTokenizer)
    # A sentencepiece run: tokenizer.model beside the tokenizer stage's report tokenizer.json and a config.json.
    sp_run = tmp_path / "sp_run"
    saved = Tokenizer.load(sp_path).save(str(sp_run))
    (sp_run / "tokenizer.json").write_text('{"path": "x", "vocab_size": 400}')
    (sp_run / "config.json").write_text("{}")
    assert saved == run_tokenizer_path(str(sp_run)) == str(sp_run / "tokenizer.model")
    assert load_tokenizer(str(sp_run)).sha256 == Tokenizer.load(sp_path).sha256
    # A Hugging Face run: the files under <run>/tokenizer/; saving again is a no-op, another tokenizer an error.
    hf_run = tmp_path / "hf_run"
    tok = HFTokenizer.load(llama_dir)
    assert tok.save(str(hf_run)) == run_tokenizer_path(str(hf_run)) == str(hf_run / "tokenizer")
    assert tok.save(str(hf_run)) == str(hf_run / "tokenizer")
    loaded = load_tokenizer(str(hf_run))
    assert isinstance(loaded, HFTokenizer) and loaded.sha256 == tok.sha256
    assert loaded.encode(TEXT) == tok.encode(TEXT) and loaded.chat_template == tok.chat_template
    with pytest.raises(FileExistsError, match=f"{hf_run / 'tokenizer'} holds another tokenizer"):
        HFTokenizer.load(write_dir(tmp_path / "other", byte_level_bpe(QWEN_SPECIALS), {"eos_token": "<|im_end|>"})
                         ).save(str(hf_run))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.load(run_tokenizer_path(str(tmp_path / "empty_run")))


def test_check_vocab_names_both_sizes(llama_dir):
    tok = HFTokenizer.load(llama_dir)
    check_vocab(tok, tok.vocab_size)
    with pytest.raises(ValueError, match=f"tokenizer {llama_dir} has {tok.vocab_size} pieces but model.vocab_size=300"):
        check_vocab(tok, 300)


def test_bad_input_names_the_file_and_value(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Hugging Face tokenizer '{tmp_path}' has no tokenizer.json"):
        HFTokenizer.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'nowhere' does not exist"):
        load_tokenizer("nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad / 'tokenizer.json'}: not a Hugging Face tokenizers file"):
        HFTokenizer.load(str(bad))
    (bad / "tokenizer.json").write_bytes(Path(llama_dir, "tokenizer.json").read_bytes())
    (bad / "tokenizer_config.json").write_text('{"eos_token": "<|eot_id|>",')
    with pytest.raises(ValueError, match=f"{bad / 'tokenizer_config.json'}: not valid JSON"):
        HFTokenizer.load(str(bad))
    (bad / "tokenizer_config.json").write_text('{"eos_token": "<|eot_id|>", "pad_token": "<pad>"}')
    with pytest.raises(ValueError, match=rf"{bad / 'tokenizer_config.json'}: pad_token='<pad>' is not in the "
                                         rf"vocabulary of {bad / 'tokenizer.json'}"):
        HFTokenizer.load(str(bad))
    (bad / "tokenizer_config.json").write_text('{"eos_token": "<|eot_id|>"}')
    (bad / "generation_config.json").write_text('{"eos_token_id": [7, "x"]}')
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id=\[7, 'x'\] is not a list of ids"):
        HFTokenizer.load(str(bad))
    os.remove(bad / "generation_config.json")
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="names no eos_token"):
        HFTokenizer.load(str(bad))


def test_a_run_generates_with_its_hf_tokenizer_and_template(qwen_dir, tmp_path):
    """generation_io.prepare_sampling (generate, rejection sampling, preference pairs) on a run whose tokenizer is a
    Hugging Face one and whose data.chat_template is "hf": the template's end of turn stops sampling."""
    from llm_jax.generate import SamplingConfig
    from llm_jax.generation_io import padding_id, prepare_sampling
    tok = HFTokenizer.load(qwen_dir)
    tok.save(str(tmp_path))
    config = ml_collections.ConfigDict({"data": {"chat_template": "hf"}})
    _, _, loaded, template, sampling = prepare_sampling(str(tmp_path), config, SamplingConfig(max_new_tokens=4), 2)
    assert loaded.sha256 == tok.sha256 and template == "hf" and padding_id(loaded) == tok.pad_id
    assert sampling.stop_ids == (tok.special_id("<|im_end|>"),)


# ---- parity with transformers on the committed fixtures ------------------------------------------------------


def reference(family: str) -> dict:
    path = FIXTURES / family / "reference.json"
    if not path.is_file():
        pytest.skip(f"{path} is not there (tests/hf/make_fixtures.py writes it)")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_text_match_transformers(family):
    ref = reference(family)
    tok = load_tokenizer(str(FIXTURES / family))
    assert isinstance(tok, HFTokenizer)
    text = ref["tokenizer_text"]
    assert tok.encode(text) == ref["tokenizer_ids_plain"]
    assert tok.encode_with_specials(text) == ref["tokenizer_ids_with_specials"]
    assert tok.decode(ref["tokenizer_ids_plain"]) == ref["decoded"]
    assert [tok.id_to_piece(i) for i in ref["tokenizer_ids_plain"]] == ref["tokens_plain"]
    assert tok.add_bos == ref["add_bos"] and tok.vocab_size == ref["tokenizer_size"]
    for name in ("bos", "eos", "pad", "unk"):
        assert tok.special_tokens.get(f"{name}_token") == ref[f"{name}_token"]
        assert getattr(tok, f"{name}_id") == ref[f"{name}_token_id"]
    assert set(ref["generation_eos_token_ids"]) <= set(tok.eos_ids) and tok.eos_ids[0] == ref["eos_token_id"]
