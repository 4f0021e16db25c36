r"""lm-evaluation-harness over any run directory: `run_lm_eval(run_dir, ["hellaswag", ...])`, or lm-eval's own entry
points in a process that imported this module (lm-eval finds models only by import): `simple_evaluate(model=
"llm_jax", model_args="run=runs/sft,step=400")`, or its command line as

    python -c "import llm_jax.eval.harness; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \
        run --model llm_jax --model_args run=runs/sft --tasks hellaswag

    run_lm_eval(run_dir, tasks, include_path=..., num_fewshot=..., limit=..., log_samples=..., out_dir=...)
        checks the tasks (names, YAML files, few-shot pools) ─▶ LlmJaxLM(run_dir) ─▶ lm_eval.simple_evaluate
        ─▶ results dict (and, with out_dir, lm-eval's own files)

The model (`LlmJaxLM`, registered with lm-eval as "llm_jax") answers lm-eval's three request types with the run's
own model, tokenizer and context (`config.data.seq_len`), and tokenizes as lm-eval's Hugging Face backend (`--model
hf`) does, so its numbers compare with an `export-hf` of the same run evaluated there (tests/eval/hf_reference.json):

    loglikelihood(context, continuation)  Σ log p(continuation tokens | context) and whether every one of them is
                                          the argmax. Context and continuation are split as lm-eval's TemplateLM
                                          splits them (the pair encoded whole, the context's tokens cut off); the
                                          tokenizer's BOS opens the context where the tokenizer adds one; an
                                          empty context is the BOS (else EOS) alone.
    loglikelihood_rolling(text)           the whole text's log-likelihood in lm-eval's rolling windows
                                          (`get_rolling_token_windows` + `make_disjoint_window`, prefix BOS or
                                          EOS, every token predicted once, each window with the most context).
                                          Like the HF backend, the text is encoded as the tokenizer encodes a
                                          document (with its BOS where it adds one), so that BOS is scored too.
    generate_until(context, gen_kwargs)   `generate.generate` with the KV cache: greedy, or sampled with
                                          `temperature` when `do_sample` (top_k, top_p only where given: no
                                          default top_k of 50 as transformers has); at most `max_gen_toks`
                                          (default 256) new tokens, ending at the tokenizer's end-of-sequence ids
                                          and the chat template's end of turn; the text (special tokens left out,
                                          as the HF backend decodes) is cut at the first of the `until` strings.

Buckets. Every request becomes one row of a fixed-shape batch: `batch_size` rows (rounded up to a multiple of the
mesh's batch shards; missing rows are one-token filler rows) of a length bucket, a power of two from 16 up to the
context, plus the context itself. Rows are sorted longest first so each batch's bucket fits its rows tightly. The
scorer is one jitted function and generation is `generate`'s jitted program per (prompt bucket, sampling), so a
whole evaluation compiles at most once per bucket it uses (per generation setting), never per request. The LM head
runs over the positions in chunks so the (rows, length, vocab) logits never exist whole for a large vocabulary.
One-token continuations of one context (multiple choice with letter answers) share one row: the scorer also
returns each row's last-position log-probabilities, which answer all of them.

Truncation. A context longer than the model's is cut from the left, as lm-eval's HF backend cuts it: a
loglikelihood row keeps the last `context + 1` tokens of context + continuation, a generation prompt the last
`context − max_gen_toks` tokens. Each such request is counted; the counts go to stderr as one warning line per
request type and into the results as `results["config"]["llm_jax"]["truncated_requests"]` (with the counts by
type). A continuation longer than the context alone, or `max_gen_toks` ≥ the context, is an EvalError.

Chat template. Only with `apply_chat_template=True`: lm-eval hands the model each prompt as messages
(`apply_chat_template(chat_history)`), rendered with the run's own template (`config.data.chat_template`, else
chatml_min; chat.py). A jinja template (an imported checkpoint's, "hf") renders to text exactly as transformers
renders it, and that text is tokenized like any other (it carries its own BOS). A built-in template renders tokens
(`chat.render_prompt`: each message encoded on its own, markers as special ids), which no text re-encodes: the
returned string (the decoded rendering) is remembered with its ids, and a context equal to it is read back as
those ids, its continuation encoded on its own as an assistant answer is in training. `tokenizer_name` and
`chat_template(...)` name the tokenizer and template in lm-eval's caches and results.

Output. `run_lm_eval` returns simple_evaluate's results made JSON-serialisable as lm-eval's command line does
(`handle_non_serializable`), with "samples" (per task, one dict per document) when `log_samples`. With `out_dir`
the files are lm-eval's own, written by its `EvaluationTracker` as `lm_eval --output_path out_dir` writes them:

    out_dir/<run dir sanitized, "/" → "__">/results_<date>.json         the results (and lm-eval's run record)
    out_dir/<run dir sanitized>/samples_<task>_<date>.jsonl             with log_samples: one line per document

and the returned results name them under results["config"]["llm_jax"]["output"]. That "llm_jax" entry (in the file
too) also records the run, step, context, batch rows, buckets, the shapes compiled, and the requests, truncations
and tokens (scored, computed with padding, generated) by type. Task names may be lm-eval's glob patterns
("mmlu_*"), expanded as its command line expands them. Datasets come as lm-eval fetches them (the Hugging Face
cache, downloading what is missing); with `offline=True` (`llm-jax eval --offline`) the call runs with
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, so only cached datasets and local task files are used and nothing
reaches the network (the tests run so). lm-eval's logging is at WARNING.

Bad input fails before any model is loaded, as one EvalError naming the thing: an unknown task (with the closest
names), a task YAML under include_path that does not parse (the file), num_fewshot beyond a task's few-shot pool
(the task and the pool's size), a run directory without a tokenizer, lm-eval not installed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import glob
import json
import logging
import os
import sys
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from llm_jax import runs, sharding
from llm_jax.data import chat
from llm_jax.data.chat_template import JinjaTemplate, TokenizerTemplate, tokenizer_template
from llm_jax.data.records import Message
from llm_jax.data.tokenizer_files import run_tokenizer_path
from llm_jax.generate import SamplingConfig, generate
from llm_jax.generation_io import batch_shards, padding_id
from llm_jax.model.transformer import Transformer
from llm_jax.objectives.lm import token_log_probs
from llm_jax.train.run_record import read_run_config

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window
except ImportError:  # the adapter is an optional extra: this module still imports, run_lm_eval says what to install
    lm_eval = None
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls

MODEL_NAME = "llm_jax"
INSTALL_HINT = "pip install -e '.[eval]'"
MIN_BUCKET = 16
DEFAULT_BATCH_SIZE = 16            # rows of a batch, also for lm-eval's batch_size=auto
DEFAULT_MAX_GEN_TOKS = 256          # as lm-eval's HF backend
HEAD_CHUNK_BYTES = 1 << 28          # f32 logits of one LM-head chunk (rows × positions × vocab × 4)
MAX_EARLY_STOP_IDS = 64             # tokens whose own text holds a stop string end a row early (an optimisation)
FEWSHOT_SEED = 1234                 # lm-eval's default few-shot (and numpy) seed, kept so numbers compare


class EvalError(ValueError):
    """Input the evaluation cannot run on; names the task, file, run or setting and its value."""


def _require_lm_eval() -> None:
    if lm_eval is None:
        raise EvalError(f"lm-evaluation-harness (the lm_eval package) is not installed; install it with "
                        f"`{INSTALL_HINT}`")


# --------------------------------------------------------------------------------------------- batching


def length_buckets(context: int) -> tuple[int, ...]:
    """Padded row lengths: powers of two from MIN_BUCKET below the context, then the context itself."""
    buckets, n = [], MIN_BUCKET
    while n < context:
        buckets.append(n)
        n *= 2
    return (*buckets, context)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


def head_chunk(rows: int, length: int, vocab: int, budget_bytes: int = HEAD_CHUNK_BYTES) -> int:
    """Positions per LM-head chunk: the largest power-of-two divisor of `length` whose f32 logits fit the budget
    (at least MIN_BUCKET), or the whole length when it fits or has no such divisor."""
    if rows * length * vocab * 4 <= budget_bytes:
        return length
    chunk = length & -length  # the largest power of two dividing length
    while chunk > MIN_BUCKET and rows * chunk * vocab * 4 > budget_bytes:
        chunk //= 2
    return chunk if chunk >= MIN_BUCKET else length


def make_score_fn(model: Transformer, head_chunk_bytes: int = HEAD_CHUNK_BYTES):
    """A jittable (params, tokens (B, T), targets (B, T), segment_ids (B, T), score_mask (B, T)) ->
    (Σ log p(target) over the scored positions (B,), every scored target the argmax (B,), log-probabilities of
    every token at each row's last real position (B, V)), the rows right-padded (segment id 0 on padding)."""

    def score_rows(params, tokens_bt, targets_bt, segment_ids_bt, score_bt):
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden_btd = model.apply(params, tokens_bt, positions_bt, segment_ids_bt)

        def head(args):
            h_bcd, y_bc = args
            logits_bcv = model.apply(params, h_bcd, method=Transformer.head)  # f32
            # argmax == target as lm-eval's backends test greediness (a tie goes to the lowest id)
            return token_log_probs(logits_bcv, y_bc), jnp.argmax(logits_bcv, axis=-1) == y_bc

        chunk = head_chunk(b, t, model.cfg.vocab_size, head_chunk_bytes)
        if chunk == t:
            log_probs_bt, hits_bt = head((hidden_btd, targets_bt))
        else:  # (n, B, C, ·): one chunk of positions at a time
            n = t // chunk
            h_nbcd = hidden_btd.reshape(b, n, chunk, -1).swapaxes(0, 1)
            y_nbc = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
            log_probs_nbc, hits_nbc = jax.lax.map(head, (h_nbcd, y_nbc))
            log_probs_bt = log_probs_nbc.swapaxes(0, 1).reshape(b, t)
            hits_bt = hits_nbc.swapaxes(0, 1).reshape(b, t)
        scored_bt = score_bt > 0
        last_b = jnp.sum(segment_ids_bt > 0, axis=1) - 1
        last_b1d = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)
        last_bv = jax.nn.log_softmax(model.apply(params, last_b1d, method=Transformer.head)[:, 0], axis=-1)
        return (jnp.sum(jnp.where(scored_bt, log_probs_bt, 0.0), axis=1),
                jnp.all(hits_bt | ~scored_bt, axis=1), last_bv)

    return score_rows


@functools.lru_cache(maxsize=16)
def _jitted_score(model: Transformer):
    # one program per model (and bucket shape), shared by every adapter built on an equal model
    return jax.jit(make_score_fn(model))


@dataclasses.dataclass(frozen=True)
class _Row:
    tokens: tuple[int, ...]   # the model's input, at most the context long
    n_scored: int             # the last n_scored inputs predict the scored targets
    target_last: int          # the token after the last input (the last scored target)


def _scoring_row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[_Row, bool]:
    """(row, truncated): context + continuation, the last max_length + 1 tokens kept (lm-eval's HF backend)."""
    whole = [*context, *continuation][-(max_length + 1):]
    return _Row(tuple(whole[:-1]), len(continuation), whole[-1]), len(context) + len(continuation) > max_length + 1


def _order(lengths: Sequence[int]) -> list[int]:
    """Indices longest first (ties in input order): each batch's rows are alike in length."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


# --------------------------------------------------------------------------------------------- the model


@register_model(MODEL_NAME)
class LlmJaxLM(TemplateLM):
    """An llm_jax run as an lm-eval model (module docstring). `run` is the run directory (`path` is accepted as
    its alias); `mesh`/`rules` shard the params and the batches; `seed` keys sampled generations."""

    backend = "causal"

    def __init__(self, run: str | None = None, *, path: str | None = None, batch_size: int | str = 16,
                 step: int | str | None = None, mesh=None, rules=None, seed: int | str = 0,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, **lm_eval_options):
        _require_lm_eval()
        super().__init__()
        run_dir = run or path
        if run_dir is None:
            raise EvalError(f"the {MODEL_NAME} model needs a run directory (model_args run=DIR)")
        unknown = set(lm_eval_options) - {"device", "max_batch_size"}  # what lm-eval's CLI always passes
        if unknown:
            raise EvalError(f"unknown {MODEL_NAME} model arguments {sorted(unknown)}; it takes run, step, "
                            f"batch_size, seed, max_gen_toks")
        config = check_run(run_dir)
        if mesh is not None and rules is None:
            rules = sharding.check_rules(config.mesh_rules)
        self.run = runs.load_run(run_dir, mesh=mesh, rules=rules, step=None if step is None else int(step))
        self.run_dir, self.step = run_dir, None if step is None else int(step)
        self.tokenizer = self.run.tokenizer
        self.context = int(config.data.seq_len)
        self.buckets = length_buckets(self.context)
        shards = batch_shards(mesh, rules)
        rows = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        if rows < 1:
            raise EvalError(f"batch_size must be ≥ 1, got {batch_size}")
        self.rows = -(-rows // shards) * shards
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.mesh = mesh
        self.template = config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
        self._pad = padding_id(self.tokenizer)
        bos = self.tokenizer.bos_id
        piece = None if bos is None else self.tokenizer.id_to_piece(bos)
        # a text opening with the BOS's own spelling already holds it (where encode reads that spelling as BOS)
        self._bos_text = piece if piece is not None and self.tokenizer.encode(piece) == [bos] else None
        self._eos_text = self.tokenizer.decode([self.eot_token_id])
        self._special_ids = self._find_special_ids()
        self._stop_ids = self._end_ids()
        self._rendered: dict[str, list[int]] = {}  # built-in chat renderings: text -> ids
        self._score = _jitted_score(self.run.model)
        self._lone_texts: list[str] | None = None
        self._batches = 0
        self.truncated = {"loglikelihood": 0, "generate_until": 0}
        self.requests = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}
        self.shapes: set[tuple] = set()  # (kind, rows, length[, sampling]) of every batch run: the compilations
        self.tokens = {"scored_inputs": 0, "computed_inputs": 0, "generated": 0}  # real, padded, new

    # ---- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.context

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer and template in lm-eval's request caches."""
        return f"{MODEL_NAME}-{self.tokenizer.sha256[:16]}-{os.path.basename(str(self.template))}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval records in its results: the jinja source, or the built-in template's name."""
        if not chat_template:
            return None
        t = self._jinja()
        return t.source if t is not None else str(self.template)

    def get_model_info(self) -> dict:
        """Merged into results["config"] by simple_evaluate."""
        return {MODEL_NAME: self.summary()}

    def summary(self) -> dict:
        return dict(run=self.run_dir, step=self.step, context=self.context, batch_rows=self.rows,
                    buckets=list(self.buckets), mesh=None if self.mesh is None else dict(self.mesh.shape),
                    chat_template=str(self.template), requests=dict(self.requests),
                    truncated_requests=sum(self.truncated.values()), truncated_by_type=dict(self.truncated),
                    tokens=dict(self.tokens),
                    compiled_shapes=sorted((list(s) for s in self.shapes), key=str))

    # ---- tokenization

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids, its BOS first where it adds one (add_special_tokens=None, as HF's encode), unless
        the text already opens with it; a built-in chat rendering is read back as its own ids."""
        if add_special_tokens is None and string in self._rendered:
            return list(self._rendered[string])
        ids = self.tokenizer.encode(string)
        if add_special_tokens is None:
            add_special_tokens = self.tokenizer.add_bos and not (
                self._bos_text is not None and string.startswith(self._bos_text))
        if add_special_tokens and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text without special tokens (bos, eos, pad, chat markers), as the HF backend decodes generations."""
        return self.tokenizer.decode([int(i) for i in tokens if int(i) not in self._special_ids])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context in self._rendered:  # a built-in chat rendering; the answer encoded alone, as in training
            return list(self._rendered[context]), self.tokenizer.encode(continuation)
        return super()._encode_pair(context, continuation)

    def _find_special_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        ids = {i for i in (tok.bos_id, tok.eos_id, tok.pad_id, *tok.eos_ids) if i is not None}
        for symbol in tok.reserved_symbols:
            with contextlib.suppress(KeyError):
                ids.add(tok.special_id(symbol))
        return frozenset(ids)

    # ---- chat template

    def _jinja(self) -> JinjaTemplate | None:
        t = chat.get_template(self.template)
        if isinstance(t, TokenizerTemplate):
            if self.tokenizer.chat_template is None:
                raise EvalError(f"run {self.run_dir} asks for the tokenizer's chat template "
                                f"(data.chat_template={self.template!r}) and its tokenizer has none")
            return tokenizer_template(self.tokenizer.chat_template,
                                      getattr(self.tokenizer, "chat_template_origin", self.tokenizer.path))
        return t if isinstance(t, JinjaTemplate) else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `chat_history` in the run's template; without the generation prompt the final
        assistant message is a prefix of the answer, continued (lm-eval's gen_prefix)."""
        messages = [Message(m["role"], m["content"]) for m in chat_history]
        prefix = ""
        if not add_generation_prompt and messages and messages[-1].role == "assistant":
            prefix = messages.pop().content
        jinja = self._jinja()
        if jinja is not None:
            return jinja.render(messages, True, **self.tokenizer.special_tokens) + prefix
        ids = [int(i) for i in chat.render_prompt(messages, self.tokenizer, self.template, where="lm-eval prompt")]
        if prefix:
            ids += self.tokenizer.encode(prefix)
        text = self.tokenizer.decode(ids)
        self._rendered[text] = ids
        return text

    # ---- scoring

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, truncated = [], 0
        for (pair, context, continuation) in requests:
            if len(continuation) > self.context:
                raise EvalError(f"a continuation of {len(continuation)} tokens is longer than the run's context of "
                                f"{self.context} tokens (data.seq_len in {self.run_dir}/config.json): "
                                f"{_preview(pair)}")
            row, cut = _scoring_row(context, continuation, self.context)
            rows.append(row)
            truncated += cut
        self._count("loglikelihood", len(rows), truncated)
        answers = self._score_rows(rows)
        for (pair, _, _), answer in zip(requests, answers):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owners = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.context, context_len=1)
            for context, predicted in map(make_disjoint_window, windows):
                rows.append(_scoring_row(context, predicted, self.context)[0])
                owners.append(i)
        self.requests["loglikelihood_rolling"] += len(requests)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._score_rows(rows)):
            totals[owner] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _score_rows(self, rows: Sequence[_Row]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        # Rows with one scored token and the same input (the one-token answers of one multiple-choice context)
        # run once: the last position's distribution answers each of them.
        sharing: dict[int, list[int]] = {}
        first_of: dict[tuple[int, ...], int] = {}
        for i, row in enumerate(rows):
            if row.n_scored == 0:  # an empty continuation: log 1, greedy
                continue
            first = first_of.setdefault(row.tokens, i) if row.n_scored == 1 else i
            sharing.setdefault(first, []).append(i)
        live = list(sharing)
        order = [live[j] for j in _order([len(rows[i].tokens) for i in live])]
        for start in range(0, len(order), self.rows):
            chunk = order[start:start + self.rows]
            length = _bucket(len(rows[chunk[0]].tokens), self.buckets)
            tokens = np.full((self.rows, length), self._pad, np.int32)
            targets = np.zeros((self.rows, length), np.int32)
            segments = np.zeros((self.rows, length), np.int32)
            scored = np.zeros((self.rows, length), np.float32)
            segments[len(chunk):, 0] = 1  # filler rows: one pad token, nothing scored
            for r, i in enumerate(chunk):
                row = rows[i]
                n = len(row.tokens)
                tokens[r, :n] = row.tokens
                targets[r, :n - 1] = row.tokens[1:]
                targets[r, n - 1] = row.target_last
                segments[r, :n] = 1
                scored[r, n - row.n_scored:n] = 1.0
            self.shapes.add(("score", self.rows, length))
            self.tokens["scored_inputs"] += sum(len(rows[i].tokens) for i in chunk)
            self.tokens["computed_inputs"] += self.rows * length
            log_probs, greedy, last_bv = jax.device_get(
                self._score(self.run.params, tokens, targets, segments, scored))
            for r, i in enumerate(chunk):
                if len(sharing[i]) == 1:
                    results[i] = (float(log_probs[r]), bool(greedy[r]))
                    continue
                best = int(np.argmax(last_bv[r]))  # the lowest id among ties, as argmax in the scorer
                for j in sharing[i]:
                    results[j] = (float(last_bv[r, rows[j].target_last]), best == rows[j].target_last)
        return results

    # ---- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        truncated = 0
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            texts, cut = self._generate_group([requests[i].args[0] for i in indices], gen_kwargs)
            truncated += cut
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        self._count("generate_until", len(requests), truncated)
        return out

    def _generate_group(self, contexts: Sequence[str], gen_kwargs: dict) -> tuple[list[str], int]:
        if not isinstance(gen_kwargs, dict):
            raise EvalError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text or None)
        max_new = int(kwargs.pop("max_gen_toks"))
        if not 1 <= max_new < self.context:
            raise EvalError(f"max_gen_toks={max_new} must be in [1, {self.context}) for the run's context of "
                            f"{self.context} tokens (data.seq_len in {self.run_dir}/config.json)")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature,
                                  top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                  stop_ids=tuple(dict.fromkeys([*self._stop_ids, *self._early_stop_ids(until)])))
        max_prompt = self.context - max_new
        prompts, truncated = [], 0
        for context in contexts:
            ids = self.tok_encode(context) or [self.prefix_token_id]
            truncated += len(ids) > max_prompt
            prompts.append(ids[-max_prompt:])
        texts: list[str] = [""] * len(prompts)
        order = _order([len(p) for p in prompts])
        for start in range(0, len(order), self.rows):
            chunk = order[start:start + self.rows]
            length = _bucket(len(prompts[chunk[0]]), self.buckets)
            batch = chunk + [chunk[0]] * (self.rows - len(chunk))  # filler rows repeat the first prompt
            tokens = np.full((self.rows, length), self._pad, np.int32)
            lengths = np.array([len(prompts[i]) for i in batch], np.int32)
            for r, i in enumerate(batch):
                tokens[r, :lengths[r]] = prompts[i]
            key = jax.random.fold_in(jax.random.key(self.seed), self._batches)
            self._batches += 1
            self.shapes.add(("generate", self.rows, length, max_new, temperature, sampling.top_k, sampling.top_p,
                             sampling.stop_ids))
            gen = generate(self.run.model, self.run.params, tokens, lengths, key, sampling)
            new_tokens, new_lengths = jax.device_get((gen.tokens, gen.lengths))
            self.tokens["generated"] += int(new_lengths[:len(chunk)].sum())
            for r, i in enumerate(chunk):
                ids = [int(t) for t in new_tokens[r, :new_lengths[r]]]
                end = next((k for k, t in enumerate(ids) if t in self._stop_ids), len(ids))
                texts[i] = postprocess_generated_text(self.tok_decode(ids[:end]), until, None)
        return texts, truncated

    def _end_ids(self) -> tuple[int, ...]:
        """Where an answer ends: the tokenizer's end-of-sequence ids and the chat template's end of turn (what an
        `export-hf` of the run lists as generation_config eos)."""
        ids = list(self.tokenizer.eos_ids)
        with contextlib.suppress(ValueError):  # a template the tokenizer cannot serve: eos alone
            ids += list(chat.stop_ids(self.tokenizer, self.template))
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _early_stop_ids(self, until: Sequence[str]) -> list[int]:
        """Ordinary tokens whose own text holds a stop string: once one is emitted, the text is cut at or before
        it whatever follows, so the row may stop there (the cut text is the same; at most MAX_EARLY_STOP_IDS)."""
        stops = [s for s in until if s]
        if not stops:
            return []
        if self._lone_texts is None:
            self._lone_texts = [self.tokenizer.decode([i]) for i in range(self.tokenizer.vocab_size)]
        found = [i for i, text in enumerate(self._lone_texts)
                 if i not in self._special_ids and any(s in text for s in stops)]
        return found[:MAX_EARLY_STOP_IDS]

    def _count(self, kind: str, n: int, truncated: int) -> None:
        self.requests[kind] += n
        self.truncated[kind] += truncated
        if truncated:
            print(f"lm-eval: warning: {truncated} of {n} {kind} requests are longer than the run's context of "
                  f"{self.context} tokens (data.seq_len); cut from the left, as lm-eval's HF backend cuts them",
                  file=sys.stderr, flush=True)



def _preview(pair, n: int = 60) -> str:
    context, continuation = pair if isinstance(pair, tuple) else ("", str(pair))
    return f"context {context[:n]!r}{'...' if len(context) > n else ''}, continuation {continuation[:n]!r}"


# --------------------------------------------------------------------------------------------- checks


def check_run(run_dir: str):
    """The run's config; EvalError when the directory, its config.json or its tokenizer is missing."""
    if not os.path.isdir(run_dir):
        raise EvalError(f"run directory {run_dir!r} does not exist")
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise EvalError(f"run directory {run_dir!r} has no config.json: not a run")
    tokenizer = run_tokenizer_path(run_dir)
    if not os.path.exists(tokenizer):
        raise EvalError(f"run directory {run_dir!r} has no tokenizer (expected {os.path.basename(tokenizer)} or "
                        f"tokenizer/ in it); lm-eval sends text, so the run's tokenizer is needed")
    return read_run_config(run_dir)


class _TaskYamlLoader(yaml.SafeLoader):
    """Parses lm-eval task files: its `!function` tags (and any other) read as plain nodes."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_task_files(include_path: str | Sequence[str]) -> None:
    """Every *.yaml under the include path(s) parses to a mapping; EvalError naming the first that does not."""
    for root in [include_path] if isinstance(include_path, (str, os.PathLike)) else include_path:
        if not os.path.isdir(root):
            raise EvalError(f"include path {str(root)!r} is not a directory of task YAML files")
        for path in sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)):
            try:
                with open(path, encoding="utf-8") as f:
                    value = yaml.load(f, Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader subclass)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise EvalError(f"task file {path} does not parse as YAML: {e}") from e
            if not isinstance(value, dict):
                raise EvalError(f"task file {path} is not a task config (a YAML mapping), got "
                                f"{type(value).__name__}")


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] | None):
    """lm-eval's TaskManager over its own tasks and the include path(s); indexing its task tree takes seconds,
    so a process builds one per include path."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(include_path) if include_path else None)


def expand_task_names(manager, tasks: Sequence[str]) -> list[str]:
    """The task names, each glob pattern ("mmlu_*") replaced by the names it matches, as lm-eval's CLI does;
    EvalError naming a name that is no task (with the closest ones)."""
    known, names = set(manager.all_tasks), []
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and os.path.isfile(name)):
            names.append(name)
            continue
        matched = manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        if matched:
            names.extend(m for m in matched if m not in names)
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EvalError(f"unknown lm-eval task {name!r}{hint} (`lm-eval ls tasks` lists them; tasks of your own "
                        f"need their directory as include_path)")
    return names


def load_tasks(manager, tasks: Sequence[str]) -> tuple[dict, list]:
    """({task name: Task} of every task the names stand for, what to hand simple_evaluate for each name: the
    Task already built for a plain task, so its documents are read once; the name of a group or tag)."""
    loaded, specs = {}, []
    for name in tasks:
        try:
            got = manager.load([name])
        except Exception as e:  # lm-eval raises what its config and dataset code raise
            entry = manager.task_index.get(name)
            where = f" ({entry.yaml_path})" if entry is not None and entry.yaml_path else ""
            raise EvalError(f"lm-eval task {name!r}{where} cannot be loaded: {type(e).__name__}: {e}") from e
        loaded.update(got["tasks"])
        plain = not got["groups"] and list(got["tasks"]) == [name]
        specs.append(got["tasks"][name] if plain else name)
    return loaded, specs


def fewshot_pool(task) -> tuple[int, int]:
    """(documents in the task's few-shot pool, the most shots it can give): one less where the pool is the
    evaluated split itself, since lm-eval leaves the evaluated document out."""
    docs = task.fewshot_docs()
    n = len(docs) if docs is not None else 0
    split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
    same = split is not None and split == task.config.test_split
    return n, max(n - 1, 0) if same else n


def check_fewshot(loaded: dict, num_fewshot: int | None) -> None:
    """num_fewshot (or a task's own) within every task's few-shot pool, as simple_evaluate will apply it."""
    for name, task in loaded.items():
        configured = task.config.num_fewshot
        shots = configured if num_fewshot is None or configured == 0 else num_fewshot
        if not shots:
            continue
        n, most = fewshot_pool(task)
        if shots > most:
            whose = "the task's own num_fewshot" if num_fewshot is None else "num_fewshot"
            raise EvalError(f"{whose}={shots} is more than lm-eval task {name!r} can draw: its few-shot pool has "
                            f"{n} documents" + (" (one is the evaluated document itself)" if most < n else ""))


@contextlib.contextmanager
def _offline_and_quiet(offline: bool) -> Iterator[None]:
    """With `offline`, HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (in the environment and in the already-imported
    libraries); lm-eval's logging at WARNING; both for the call."""
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    if offline:
        os.environ.update({k: "1" for k in saved_env})
    patched = []
    for module_name, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                               ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))) if offline else ():
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        for module, attr, value in patched:
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise EvalError("no lm-eval tasks named")
    return names


def _serialisable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=handle_non_serializable, ensure_ascii=False))


# --------------------------------------------------------------------------------------------- entry point


def run_lm_eval(run_dir: str, tasks: str | Sequence[str], *, include_path: str | Sequence[str] | None = None,
                num_fewshot: int | None = None, limit: int | float | None = None, log_samples: bool = False,
                out_dir: str | None = None, batch_size: int = 16, step: int | None = None,
                apply_chat_template: bool = False, mesh=None, rules=None, seed: int = 0,
                offline: bool = False) -> dict:
    """Evaluates the run on lm-eval `tasks` (names, or a comma-separated string) and returns the results
    (module docstring). `seed` keys sampled generations and is lm-eval's random_seed; its few-shot draws keep
    lm-eval's default seed, so the numbers compare with lm-eval runs of other backends."""
    _require_lm_eval()
    names = _task_list(tasks)
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"num_fewshot must be ≥ 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise EvalError(f"limit must be > 0, got {limit}")
    check_run(run_dir)
    include = None
    if include_path is not None:
        include = (str(include_path),) if isinstance(include_path, (str, os.PathLike)) else tuple(map(str, include_path))
    from lm_eval.loggers import EvaluationTracker

    with _offline_and_quiet(offline):
        if include:
            check_task_files(include)
        manager = task_manager(include)
        names = expand_task_names(manager, names)
        loaded, specs = load_tasks(manager, names)
        check_fewshot(loaded, num_fewshot)
        model = LlmJaxLM(run_dir, batch_size=batch_size, step=step, mesh=mesh, rules=rules, seed=seed)
        tracker = EvaluationTracker(output_path=out_dir) if out_dir else None
        results = lm_eval.simple_evaluate(
            model=model, model_args={"path": run_dir, "step": step}, tasks=specs, num_fewshot=num_fewshot,
            limit=limit, log_samples=log_samples, task_manager=manager, evaluation_tracker=tracker,
            apply_chat_template=apply_chat_template, batch_size=model.rows, random_seed=seed,
            numpy_random_seed=FEWSHOT_SEED, torch_random_seed=FEWSHOT_SEED, fewshot_random_seed=FEWSHOT_SEED)
    samples = results.pop("samples", None)
    output = {}
    if tracker is not None:
        output = _save(tracker, results, samples if log_samples else None, out_dir)
    results = _serialisable(results)
    if output:
        results["config"][MODEL_NAME]["output"] = output
    if log_samples and samples is not None:
        results["samples"] = _serialisable(samples)
    return results


def _save(tracker, results: dict, samples: dict | None, out_dir: str) -> dict:
    """lm-eval's own files, as its command line writes them; the paths written."""
    tracker.save_results_aggregated(results=results, samples=samples)
    date_id = getattr(tracker, "date_id", None)
    directory = os.path.join(out_dir, str(tracker.general_config_tracker.model_name_sanitized))
    results_file = os.path.join(directory, f"results_{date_id}.json")
    if date_id is None or not os.path.isfile(results_file):  # the tracker logs its own failures and goes on
        raise EvalError(f"lm-eval could not write its results under {out_dir!r}")
    written = {"results": results_file}
    if samples is not None:
        written["samples"] = {}
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=copy.deepcopy(samples[task_name]))
            path = os.path.join(directory, f"samples_{task_name}_{date_id}.jsonl")
            if not os.path.isfile(path):
                raise EvalError(f"lm-eval could not write the samples of task {task_name!r} under {out_dir!r}")
            written["samples"][task_name] = path
    return written


