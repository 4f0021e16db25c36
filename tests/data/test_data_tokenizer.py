"""Tokenizer: fixed special ids, lossless round trip, deterministic training, clear errors."""
import pytest

from llm_jax.data import default_corpus
from llm_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, check_vocab, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return [t for t, _ in default_corpus.generate_documents(200)]


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return train_tokenizer(corpus, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"), vocab_size=512)


def test_fixed_ids_and_special_symbols(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 512
    for symbol in SPECIAL_TOKENS:
        i = tok.special_id(symbol)
        assert i in tok.encode(f"hello {symbol} there")
        assert tok.decode([i]) == symbol
    with pytest.raises(KeyError, match="'the' is not a special symbol"):
        tok.special_id("the")


def test_round_trip_is_lossless(tok, corpus):
    odd = ["  leading and  double spaces\n\n\nthree newlines\t tab", "ünïcödé ☃ 漢字 <|user|>hi<|end|>", ""]
    texts = corpus + odd
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert [tok.decode(i) for i in ids] == texts
    assert tok.unk_id not in {i for seq in ids for i in seq}


def test_training_is_deterministic_and_load_round_trips(tok, corpus, tmp_path):
    again = train_tokenizer(corpus, str(tmp_path / "again.model"), vocab_size=512)
    assert again.sha256 == tok.sha256
    loaded = Tokenizer.load(tok.path)
    assert loaded.sha256 == tok.sha256 and loaded.encode(corpus[0]) == tok.encode(corpus[0])
    other = train_tokenizer(corpus, str(tmp_path / "other.model"), vocab_size=600)
    assert other.sha256 != tok.sha256


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"definitely not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        Tokenizer.load(str(tmp_path / "junk.model"))


def test_check_vocab(tok):
    check_vocab(tok, 512)
    check_vocab(tok, 1024)
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.model has 512 pieces but model.vocab_size=256"):
        check_vocab(tok, 256)


def test_too_small_vocab_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 leaves no room"):
        train_tokenizer(corpus, str(tmp_path / "t.model"), vocab_size=100)


def test_long_documents_are_chunked_for_training(corpus, tmp_path):
    # One huge "document" would be dropped by the trainer; chunking keeps its text in training.
    tok = train_tokenizer(["\n\n".join(corpus)], str(tmp_path / "long.model"), vocab_size=512,
                          max_sentence_chars=2000)
    text = "\n\n".join(corpus[:20])
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < 0.6 * len(text)  # it learned multi-character pieces from the chunks
