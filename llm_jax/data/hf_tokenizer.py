"""Hugging Face tokenizers behind the interface of the sentencepiece `Tokenizer`, so every stage runs on an
imported checkpoint's own vocabulary, special tokens and chat template.

A tokenizer directory, as the Hub and `save_pretrained` write it:

    tokenizer.json           the `tokenizers` pipeline (normalizer, pre-tokenizer, model, post-processor); required
    tokenizer_config.json    named special tokens (bos_token, eos_token, ...) and the chat template
    special_tokens_map.json  named special tokens of older checkpoints (read when tokenizer_config.json has no
                             added_tokens_decoder, as transformers does)
    generation_config.json   eos_token_id: every id that ends generation (Llama 3 instruct: <|eot_id|> as well)
    chat_template.jinja      the chat template; takes priority over tokenizer_config.json's "chat_template"

Behaviour matches transformers 5's AutoTokenizer on the same files (tests/hf/fixtures hold its outputs):
encode adds no special tokens but reads special-token strings in the text as their ids; encode_with_specials
adds what tokenizer.json's post-processor adds (transformers 5 drops add_bos_token / add_eos_token when a
tokenizer.json exists, so the post-processor alone decides); decode keeps special tokens and does no
clean_up_tokenization (transformers 5 skips it for BPE models, and it would break decode(encode(x)) == x).
A special token named in tokenizer_config.json must be in the vocabulary: transformers would silently add it
with an id past the model's embedding.

A run keeps these files under `<run>/tokenizer/` (RUN_DIR), beside the tokenizer stage's own tokenizer.json report.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Sequence

import tokenizers

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "chat_template.jinja")
RUN_DIR = "tokenizer"


class HFTokenizer:
    """A loaded Hugging Face tokenizer directory; `sha256` identifies its files' bytes (cache keys, lineage)."""

    def __init__(self, directory: str):
        self._path = directory
        main = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(main):
            raise FileNotFoundError(f"Hugging Face tokenizer {directory!r} has no tokenizer.json")
        self._files = {}
        for name in FILES:
            if os.path.isfile(os.path.join(directory, name)):
                with open(os.path.join(directory, name), "rb") as f:
                    self._files[name] = f.read()
        try:
            self._tok = tokenizers.Tokenizer.from_str(self._files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception; bad UTF-8 raises UnicodeDecodeError
            raise ValueError(f"{main}: not a Hugging Face tokenizers file ({e})") from e
        self._offsets_tok = None
        self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        self._specials = tuple(t.content for _, t in sorted(self._tok.get_added_tokens_decoder().items())
                               if t.special)
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        config = self._json("tokenizer_config.json")
        self._named = self._named_tokens(config)
        self._ids = {name: self._tok.token_to_id(token) for name, token in self._named.items()}
        generation_eos = self._generation_eos()
        eos = self._ids.get("eos_token")
        if eos is None and not generation_eos:
            raise ValueError(f"Hugging Face tokenizer {directory!r} names no eos_token (tokenizer_config.json) and "
                             f"no eos_token_id (generation_config.json)")
        self._eos_id = eos if eos is not None else generation_eos[0]
        self._eos_ids = tuple(dict.fromkeys([self._eos_id, *generation_eos]))
        self._chat_template, self._chat_template_origin = self._template(config)
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        self._add_bos = self.bos_id is not None and with_specials[0] == self.bos_id != self.encode("a")[0]
        digest = hashlib.sha256()
        for name, data in self._files.items():  # FILES order: the same files give the same hash
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        self._sha256 = digest.hexdigest()

    @classmethod
    def load(cls, directory: str) -> "HFTokenizer":
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Hugging Face tokenizer directory {directory!r} does not exist")
        return cls(directory)

    def _json(self, name: str) -> dict:
        if name not in self._files:
            return {}
        path = os.path.join(self._path, name)
        try:
            value = json.loads(self._files[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
        return value

    def _named_tokens(self, config: dict) -> dict[str, str]:
        """{"bos_token": "<s>", ...}: every `*_token` of tokenizer_config.json with a string (or AddedToken)
        value, which transformers passes to chat templates; each must be in the vocabulary."""
        source, origin = dict(config), "tokenizer_config.json"
        if "added_tokens_decoder" not in config and "special_tokens_map.json" in self._files:
            source.update(self._json("special_tokens_map.json"))
            origin = "tokenizer_config.json / special_tokens_map.json"
        extra = source.get("extra_special_tokens")
        if isinstance(extra, dict):  # model-specific names (Gemma 3's boi_token, ...) in the transformers 5 form
            source.update(extra)
        named = {}
        for key, value in source.items():
            content = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(content, str):
                if self._tok.token_to_id(content) is None:
                    raise ValueError(f"{os.path.join(self._path, origin)}: {key}={content!r} is not in the vocabulary "
                                     f"of {os.path.join(self._path, 'tokenizer.json')}")
                named[key] = content
        return named

    def _generation_eos(self) -> list[int]:
        eos = self._json("generation_config.json").get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and 0 <= i < self._vocab_size for i in eos):
            raise ValueError(f"{os.path.join(self._path, 'generation_config.json')}: eos_token_id={eos!r} is not a "
                             f"list of ids below the vocabulary size {self._vocab_size}")
        return eos

    def _template(self, config: dict) -> tuple[str | None, str]:
        """(jinja source or None, where it came from) as transformers picks it."""
        if "chat_template.jinja" in self._files:
            return self._files["chat_template.jinja"].decode("utf-8"), os.path.join(self._path, "chat_template.jinja")
        origin = f"{os.path.join(self._path, 'tokenizer_config.json')} (chat_template)"
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates (default, tool_use, rag): the default one is the chat
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
            origin = f"{os.path.join(self._path, 'tokenizer_config.json')} (chat_template 'default')"
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{origin}: expected a string, got {type(template).__name__}")
        return template, origin

    def _untrimmed(self) -> tokenizers.Tokenizer:
        # A ByteLevel post-processor with trim_offsets moves spans off their whitespace even without special
        # tokens; without a post-processor the ids are the same and every span covers its own characters.
        if self._offsets_tok is None:
            self._offsets_tok = tokenizers.Tokenizer.from_str(self._files["tokenizer.json"].decode("utf-8"))
            self._offsets_tok.post_processor = None
        return self._offsets_tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        # `tokenizers` sizes its own thread pool (RAYON_NUM_THREADS); the ids do not depend on it.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_with_specials(self, text: str) -> list[int]:
        """What transformers' `tokenizer(text).input_ids` gives: bos (and eos) where the checkpoint adds them."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's (start, end) character span in text (bytes of one character share it)."""
        encoding = self._untrimmed().encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"id {i} is outside the vocabulary of tokenizer {self._path} ({self._vocab_size} ids)")
        return piece

    def special_id(self, symbol: str) -> int:
        """The id of an added token (a special token like <|im_end|>, or a chat symbol like <think>)."""
        if symbol not in self._added:
            raise KeyError(f"{symbol!r} is not a special symbol of tokenizer {self._path}")
        return self._added[symbol]

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included: the embedding rows the ids need."""
        return self._vocab_size

    @property
    def pad_id(self) -> int | None:
        return self._ids.get("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._ids.get("unk_token")

    @property
    def bos_id(self) -> int | None:
        return self._ids.get("bos_token")

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos, then generation_config.json's eos_token_id."""
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether encode_with_specials opens a text with bos (Llama, Gemma, Mistral do; Qwen has no bos)."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def chat_template_origin(self) -> str:
        """The file (and key) the chat template came from, for error messages."""
        return self._chat_template_origin

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens as a chat template reads them (bos_token, eos_token, ...)."""
        return dict(self._named)

    @property
    def reserved_symbols(self) -> tuple[str, ...]:
        """The special added tokens: encode() reads them as control tokens even inside message content."""
        return self._specials

    @property
    def path(self) -> str:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    def save(self, directory: str) -> str:
        """Copies the files to `<directory>/tokenizer/` (kept if already there with the same bytes) and returns
        that path; FileExistsError if another tokenizer is there."""
        target = os.path.join(directory, RUN_DIR)
        if os.path.exists(target):
            if HFTokenizer.load(target).sha256 != self._sha256:
                raise FileExistsError(f"{target} holds another tokenizer than {self._path}")
            return target
        tmp = f"{target}.tmp.{os.getpid()}"  # every host may copy at once: each its own temporary, one rename
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, data in self._files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another host renamed first: theirs stays if it is the same tokenizer
            shutil.rmtree(tmp, ignore_errors=True)
            if HFTokenizer.load(target).sha256 != self._sha256:
                raise FileExistsError(f"{target} holds another tokenizer than {self._path}") from None
        return target

    def __repr__(self) -> str:
        return f"HFTokenizer({self._path!r}, vocab_size={self.vocab_size}, sha256={self._sha256[:12]})"
