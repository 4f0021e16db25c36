"""SentencePiece tokenizer: training (deterministic, atomic) and a small wrapper with fixed special ids.

Ids 0..3 are pad, unk, bos, eos in every model we train. The chat-template symbols are reserved now as
user-defined pieces so that later post-training stages (SFT, RM, PPO, DPO) can use them without retraining
the tokenizer and invalidating the pretrained embedding. "\\n" is a user-defined piece too: the trainer
would otherwise treat newlines as sentence boundaries and never learn them, and paragraph breaks matter.
Text is not normalised and byte fallback is on, so decode(encode(x)) == x for any string.

Hugging Face tokenizers (`hf_tokenizer.HFTokenizer`) have the same interface; `tokenizer_files.load_tokenizer`
picks the class from the path. A run keeps its sentencepiece model as `<run>/tokenizer.model` (RUN_FILE).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from typing import Iterable, Sequence

import sentencepiece as spm

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NEWLINE = "\n"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_TRAINING_CHUNKS = 1_000_000
RUN_FILE = "tokenizer.model"  # where a run directory keeps its sentencepiece model


class Tokenizer:
    """A loaded SentencePiece model; `sha256` identifies the model file (cache keys, run lineage)."""

    def __init__(self, model_bytes: bytes, path: str):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
        self._path = path
        self._sha256 = hashlib.sha256(model_bytes).hexdigest()
        for name, got, want in (("pad", self._sp.pad_id(), PAD_ID), ("unk", self._sp.unk_id(), UNK_ID),
                                ("bos", self._sp.bos_id(), BOS_ID), ("eos", self._sp.eos_id(), EOS_ID)):
            if got != want:
                raise ValueError(f"tokenizer {path} has {name}_id={got}, expected {want}")

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        # The C++ side encodes a list on several threads; the result does not depend on the thread count.
        return self._sp.encode(list(texts), num_threads=num_threads)

    def encode_with_specials(self, text: str) -> list[int]:
        """[bos] ids [eos]: a document as pretraining reads it (`pipeline._tokenize`)."""
        return [BOS_ID, *self.encode(text), EOS_ID]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's (start, end) character span in text; the pieces of a character split
        into bytes share its span (the first ones empty), the word marker opening a text is empty at 0."""
        mapping = self._sp.encode_as_offset_mapping(text)
        return list(mapping["ids"]), [tuple(o) for o in mapping["offsets"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def special_id(self, symbol: str) -> int:
        """The id of a reserved symbol (a chat-template token, newline, or a control piece like <s>)."""
        i = self._sp.piece_to_id(symbol)
        reserved = symbol in SPECIAL_TOKENS or symbol == NEWLINE or self._sp.is_control(i)
        if i == UNK_ID or self._sp.id_to_piece(i) != symbol or not reserved:
            raise KeyError(f"{symbol!r} is not a special symbol of tokenizer {self._path}")
        return i

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def add_bos(self) -> bool:
        return True  # encode_with_specials opens every document with bos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation."""
        return (EOS_ID,)

    @property
    def chat_template(self) -> str | None:
        return None  # the built-in templates of chat.py are written for these symbols

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens as a chat template reads them (bos_token, eos_token, ...)."""
        return {f"{name}_token": self._sp.id_to_piece(i)
                for name, i in (("bos", BOS_ID), ("eos", EOS_ID), ("unk", UNK_ID), ("pad", PAD_ID))}

    @property
    def reserved_symbols(self) -> tuple[str, ...]:
        """Strings that encode() reads as a chat symbol even inside text: message content may not hold them."""
        return SPECIAL_TOKENS

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def path(self) -> str:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    def save(self, directory: str) -> str:
        """Copies the model to `<directory>/tokenizer.model` (kept if already there with the same bytes) and
        returns that path; FileExistsError if another tokenizer is there."""
        target = os.path.join(directory, RUN_FILE)
        if os.path.exists(target):
            if Tokenizer.load(target).sha256 != self._sha256:
                raise FileExistsError(f"{target} holds another tokenizer than {self._path}")
            return target
        os.makedirs(directory, exist_ok=True)
        tmp = f"{target}.tmp.{os.getpid()}"  # every host may copy at once: each its own temporary, one rename
        shutil.copyfile(self._path, tmp)
        os.replace(tmp, target)
        return target

    def __repr__(self) -> str:
        return f"Tokenizer({self._path!r}, vocab_size={self.vocab_size}, sha256={self._sha256[:12]})"


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 1.0, max_sentence_chars: int = 20000,
                    seed: int = 0) -> Tokenizer:
    """Trains a SentencePiece model on `texts` and writes it atomically to `model_path`.

    One trainer thread and a fixed seed make the model bytes a function of the corpus and the arguments.
    Documents longer than `max_sentence_chars` are cut into chunks of that size (the trainer would
    otherwise drop them).
    """
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"tokenizer model_type must be unigram, bpe, char or word, got {model_type!r}")
    min_vocab = 4 + len(SPECIAL_TOKENS) + 1 + 256  # specials, newline, byte fallback
    if vocab_size <= min_vocab:
        raise ValueError(f"tokenizer vocab_size={vocab_size} leaves no room for learned pieces "
                         f"(reserved: {min_vocab})")

    def chunks():
        for text in texts:
            for start in range(0, len(text), max_sentence_chars):
                piece = text[start:start + max_sentence_chars]
                if piece.strip():
                    yield piece

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, max_sentence_length=max_sentence_chars * 4,  # bytes
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=list(SPECIAL_TOKENS) + [NEWLINE],
            normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
            allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
            # Past this many chunks the trainer samples (seeded above); it bounds memory on big corpora.
            input_sentence_size=MAX_TRAINING_CHUNKS, shuffle_input_sentence=True)
    except RuntimeError as e:
        raise ValueError(f"training tokenizer {model_path} (vocab_size={vocab_size}) failed: {e}") from e
    model_bytes = model.getvalue()
    directory = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{model_path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model_bytes)
    os.replace(tmp, model_path)
    return Tokenizer(model_bytes, model_path)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Fails if the tokenizer (sentencepiece or Hugging Face) can emit ids the model's embedding has no row for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces "
                         f"but model.vocab_size={model_vocab_size}")
