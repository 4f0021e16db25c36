"""Generation over a prompts file: read and render the prompts, batch them, sample, write one jsonl row each.

    llm-jax generate --run runs/sft --prompts prompts.jsonl --out answers.jsonl [--max-new-tokens 64 ...]

With `--no-chat-template` each prompt's text is fed as it is, tokenized the way the checkpoint's tokenizer does (a
BOS where it adds one; `encode_with_specials`), and sampling stops at its end-of-sequence ids: completion prompts,
base models. Otherwise prompts are read with `records.iter_prompt_examples` (jsonl, jsonl.gz or parquet; `{"prompt": str | messages,
...}`) and rendered with the run's chat template (`config.data.chat_template`, else chatml_min) as
`[bos] turns <|assistant|>`. Everything is read and rendered before the params are restored, so a bad record
fails at once, naming its file:line.

Context. A prompt must fit in the run's context, `config.data.seq_len` (the longest sequence the model was
trained on). A longer multi-turn prompt loses whole exchanges from the front, as in training
(`chat.render_prompt`); one whose last user turn alone is too long is an error naming its file:line. A plain-text
prompt (`--no-chat-template`) that is too long keeps its BOS and its last tokens, cut from the left as lm-eval's
HF backend cuts a context. Either way the prompt counts as `truncated` and a warning names the first. The answer
may run past the context (rotary positions have no end); a note on stderr says when some prompt plus
`max_new_tokens` would, since the model never saw such positions in training.

Batching. Prompts go in file order, `batch_size` at a time, right-padded to the batch's longest prompt rounded
up to a multiple of PAD_MULTIPLE; a short last batch is filled up to a power of two with copies of its first
prompt (their answers are dropped). So a file compiles a few (rows, length) shapes, not one per batch. Batch i
samples with key fold_in(key(seed), i): the same file, seed and batch size give the same answers.

Rows, one per prompt in file order:

    where        "path:line" of the prompt's record
    prompt       the prompt as given: a string (with "system" when the record had one) or a list of messages
    metadata     the record's other keys (e.g. "task")
    response     the answer's text: the emitted tokens up to, not including, a stop token
    tokens       the emitted token ids (a final stop token included)
    log_probs    one per token, under softmax(logits / temperature), temperature 1 when greedy (generate.py)
    stopped      whether the answer ended with a stop token (<|end|> or eos) rather than at max_new_tokens
    prompt_tokens  the rendered prompt's length in tokens
    prompt_token_ids  the rendered prompt's token ids
    gold_score   with the default judge `gold`, only for records with a "task" key: the embedded task's
                 `default_task.gold_score(prompt, response)` in [0, 1] (a "task" record whose prompt that
                 program rejects fails at reading, naming its file:line)
    score        with any other judge (`--judge`: a reward run, exact_match, regex_match, numeric_match or
                 module:function; eval/judges.py), its score of the response, for every record it applies to

The summary `generate_file` returns (and the command prints as JSON): count, new_tokens, seconds (the wall time
of all batches, compilation included) and tokens_per_s, stopped and truncated counts, batches and the (rows,
length) shapes compiled, and the judge's mean (`gold_score` or `score`) over its `scored` rows.

Sharding: `generate_file(..., mesh=...)` restores the params on the mesh and fills every batch up to a multiple
of the mesh's batch shards; the command itself runs on one host's default device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Iterator, Sequence

import jax
import numpy as np

from llm_jax import runs, sharding
from llm_jax.train import run_record
from llm_jax.data import chat, records
from llm_jax.data.sources import DataError, resolve_files
from llm_jax.data.tokenizer_files import AnyTokenizer as Tokenizer, load_tokenizer, run_tokenizer_path
from llm_jax.generate import SamplingConfig, generate
from llm_jax.train.checkpoint import CheckpointError, intact_step

PAD_MULTIPLE = 16  # prompt lengths are padded up to this: one compilation serves many batches


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    example: records.PromptExample
    tokens: np.ndarray   # (P,) int32: [bos] turns <|assistant|>
    truncated: bool      # early exchanges were dropped to fit the context
    scored: bool         # the judge applies to it

    @property
    def record(self) -> dict:
        """The prompt record a judge reads (eval/judges.py prompt_record)."""
        return records.prompt_record(self.example)


def score_field(judge) -> str:
    """The row field of a judge's scores: `gold_score` for the gold judge, `score` for any other."""
    return "gold_score" if judge.name == "gold" else "score"


def scored_by(judge, example: records.PromptExample) -> bool:
    """Whether `judge` judges the prompt; a judge with `check_prompt` (gold) refuses a prompt it applies to but cannot
    score (DataError naming where)."""
    if judge is None:
        return False
    record = records.prompt_record(example)
    applies = getattr(judge, "applies", None)
    if applies is not None and not applies(record):
        return False
    if hasattr(judge, "check_prompt"):
        judge.check_prompt(record, example.where)
    return True


def read_prompts(spec: str, tokenizer: Tokenizer, *, template: str = chat.DEFAULT_TEMPLATE,
                 max_len: int | None = None, format: str = "auto", judge=None,
                 chat_template: bool = True) -> list[RenderedPrompt]:
    """Every prompt the spec names, rendered, and marked `scored` where `judge` applies to it; DataError naming
    file:line for a bad or too long one.

    `chat_template=False`: each prompt is one text, tokenized as it is the way the checkpoint's tokenizer does
    (`encode_with_specials`: a BOS where it adds one), for completion-style prompts and base models."""
    rendered = []
    for example in records.iter_prompt_examples(spec, format):
        if not chat_template:
            rendered.append(_raw_prompt(example, tokenizer, max_len, scored_by(judge, example)))
            continue
        tokens = chat.render_prompt(example.prompt, tokenizer, template, where=example.where)
        truncated = max_len is not None and len(tokens) > max_len
        if truncated:
            # raises ExampleTooLong (a DataError naming where) when the last exchange alone does not fit
            tokens = chat.render_prompt(example.prompt, tokenizer, template, max_len=max_len, where=example.where)
        rendered.append(RenderedPrompt(example, tokens, truncated, scored_by(judge, example)))
    if not rendered:
        raise DataError(f"{spec}: no prompts (the file has no records)")
    return rendered


def padding_id(tokenizer: Tokenizer) -> int:
    """The id right-padding a batch: pad, else eos for tokenizers without one (Llama 3); padded positions are
    never attended to or scored, but must be an id the embedding has."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def _raw_prompt(example: records.PromptExample, tokenizer: Tokenizer, max_len: int | None,
                scored: bool) -> RenderedPrompt:
    messages = example.prompt
    if len(messages) != 1 or messages[0].role != "user":
        raise DataError(f"{example.where}: without a chat template a prompt must be one text, got "
                        f"{len(messages)} messages ({', '.join(m.role for m in messages)})")
    ids, body = tokenizer.encode_with_specials(messages[0].content), tokenizer.encode(messages[0].content)
    if ids and ids[-1] in tokenizer.eos_ids and ids[len(ids) - 1 - len(body):-1] == body:
        ids = ids[:-1]  # a prompt is continued, not closed: no end-of-sequence a tokenizer appends to documents
    if not ids:
        raise DataError(f"{example.where}: the prompt is empty")
    truncated = max_len is not None and len(ids) > max_len
    if truncated:  # cut from the left, as lm-eval's HF backend cuts a context; a BOS still opens it
        head = ids[:1] if ids[0] == tokenizer.bos_id else []
        ids = head + ids[len(ids) - (max_len - len(head)):]
    return RenderedPrompt(example, np.asarray(ids, np.int32), truncated, scored)


def padded_length(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def batch_shards(mesh, rules) -> int:
    """How many ways the mesh splits a batch's rows (the mesh axes of the logical "batch" axis)."""
    if mesh is None:
        return 1
    axes = sharding.logical_to_spec(("batch",), rules)[0]
    axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    return math.prod(mesh.shape[a] for a in axes)


def batches(prompts: Sequence[RenderedPrompt], batch_size: int, pad_id: int = 0, row_multiple: int = 1
            ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(number of real rows n, tokens (B, P) right-padded, lengths (B,)) in file order; rows n.. are filler.

    A short last batch gets the next power of two of rows (a multiple of `row_multiple`, at most batch_size)."""
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = len(chunk)
        rows = max(1 << (n - 1).bit_length(), row_multiple)
        rows = batch_size if n == batch_size else min(batch_size, padded_length(rows, row_multiple))
        chunk += [chunk[0]] * (rows - n)
        lengths_b = np.array([len(p.tokens) for p in chunk], np.int32)
        tokens_bp = np.full((rows, padded_length(int(lengths_b.max()))), pad_id, np.int32)
        for row, p in enumerate(chunk):
            tokens_bp[row, :len(p.tokens)] = p.tokens
        yield n, tokens_bp, lengths_b


def decode_response(tokenizer: Tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[str, bool]:
    """(text, stopped) of emitted token ids: a final stop token ends the answer and is not part of its text."""
    stopped = bool(ids) and ids[-1] in stop_ids
    return tokenizer.decode(list(ids[:-1]) if stopped else list(ids)), stopped


def response_row(prompt: RenderedPrompt, tokens: np.ndarray, log_probs: np.ndarray, length: int,
                 stop_ids: Sequence[int], tokenizer: Tokenizer) -> dict:
    """The output row of one prompt from its generated tokens (B=1 slices of a `Generation`); its score is
    added by `judge_rows`."""
    ids = [int(i) for i in tokens[:length]]
    response, stopped = decode_response(tokenizer, ids, stop_ids)
    messages = prompt.example.prompt
    row = dict(where=prompt.example.where)
    if len(messages) == 1:
        row["prompt"] = messages[0].content
    elif len(messages) == 2 and messages[0].role == "system":
        row["prompt"], row["system"] = messages[1].content, messages[0].content
    else:
        row["prompt"] = [dataclasses.asdict(m) for m in messages]
    row.update(metadata=prompt.example.metadata, response=response, tokens=ids,
               log_probs=[float(x) for x in log_probs[:length]], stopped=stopped,
               prompt_tokens=len(prompt.tokens), prompt_token_ids=[int(i) for i in prompt.tokens])
    return row


def judge_rows(judge, prompts: Sequence[RenderedPrompt], rows: Sequence[dict]) -> list[float]:
    """Has `judge` score, in one call, the rows whose prompt it judges; writes each score into its row
    (`score_field`) and returns them."""
    if judge is None:
        return []
    index = [i for i, p in enumerate(prompts) if p.scored]
    if not index:
        return []
    scores = judge.score([prompts[i].record for i in index], [rows[i]["response"] for i in index])
    field = score_field(judge)
    for i, value in zip(index, scores):
        rows[i][field] = float(value)
    return [float(v) for v in scores]


def default_out_path(run_dir: str, spec: str) -> str:
    name = os.path.basename(resolve_files(spec)[0])
    for ext in (".gz", ".jsonl", ".json", ".parquet"):
        name = name[:-len(ext)] if name.endswith(ext) else name
    return os.path.join(run_dir, "generations", f"{name}.jsonl")


def checkpoint_step(run_dir: str, step: int | None) -> int | None:
    """The step `load_run` restores: `step`, or the newest intact checkpoint (None if there is none)."""
    return intact_step(run_dir, step)


def prepare_sampling(run_dir: str, config, sampling: SamplingConfig, batch_size: int, mesh=None, rules=None,
                     chat_template: bool = True):
    """(rules, batch shards, tokenizer, chat template, sampling stopping at the template's end) for sampling
    from a run in batches of `batch_size` on `mesh`; the batch must divide over the mesh's batch shards.
    Without the chat template, sampling stops at the tokenizer's end-of-sequence ids."""
    if mesh is not None and rules is None:
        rules = sharding.check_rules(config.mesh_rules)
    shards = batch_shards(mesh, rules)
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} does not divide over the mesh's {shards} batch shards")
    tokenizer = load_tokenizer(run_tokenizer_path(run_dir))
    template = config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
    stops = chat.stop_ids(tokenizer, template) if chat_template else tokenizer.eos_ids
    sampling = dataclasses.replace(sampling, stop_ids=tuple(stops))
    return rules, shards, tokenizer, template, sampling


def answer_prompts(model, params, prompts: Sequence[RenderedPrompt], sampling: SamplingConfig, tokenizer, *,
                   batch_size: int, seed: int = 0, shards: int = 1, use_cache: bool = True,
                   progress: str | None = None) -> tuple[list[dict], set]:
    """(one row per prompt in order (module docstring, without scores), the (rows, length) shapes compiled):
    the model's answers with `params`, batch i sampled with key fold_in(key(seed), i). `progress`: the command
    name to report batches under on stderr, or None."""
    key = jax.random.key(seed)
    rows, shapes, n_tokens = [], set(), 0
    n_batches = -(-len(prompts) // batch_size)
    start = time.perf_counter()
    for i, (n, tokens_bp, lengths_b) in enumerate(batches(prompts, batch_size, padding_id(tokenizer), shards)):
        out = generate(model, params, tokens_bp, lengths_b, jax.random.fold_in(key, i), sampling,
                       use_cache=use_cache)
        tokens, log_probs, lengths = jax.device_get((out.tokens, out.log_probs, out.lengths))
        shapes.add(tokens_bp.shape)
        for row in range(n):
            rows.append(response_row(prompts[len(rows)], tokens[row], log_probs[row], int(lengths[row]),
                                     sampling.stop_ids, tokenizer))
        n_tokens += int(lengths[:n].sum())
        if progress:
            print(f"{progress}: batch {i + 1}/{n_batches}, {len(rows)}/{len(prompts)} prompts, {n_tokens} tokens, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows, shapes


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """One JSON object a line, written whole and then renamed: an earlier file of the same name survives a
    failed run."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def generate_file(run_dir: str, prompts_spec: str, out_path: str | None, sampling: SamplingConfig, *,
                  batch_size: int = 32, seed: int = 0, step: int | None = None, use_cache: bool = True,
                  mesh=None, rules=None, format: str = "auto", progress: bool = True,
                  chat_template: bool = True, judge=None) -> dict:
    """Generates an answer to every prompt of `prompts_spec` with the run's model; writes the rows (module
    docstring) to `out_path` (default <run>/generations/<prompts name>.jsonl) and returns a summary. `judge`:
    what scores the answers (a judge of eval/judges.py, `load_judge`), None for no scores."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} does not exist")
    config = run_record.read_run_config(run_dir)
    rules, shards, tokenizer, template, sampling = prepare_sampling(run_dir, config, sampling, batch_size, mesh,
                                                                    rules, chat_template)
    context = int(config.data.seq_len)
    try:
        prompts = read_prompts(prompts_spec, tokenizer, template=template, max_len=context, format=format,
                               judge=judge, chat_template=chat_template)
    except chat.ExampleTooLong as e:
        raise DataError(f"{e}, the run's context (data.seq_len in {run_dir}/config.json)") from e
    if judge is not None and hasattr(judge, "load"):
        judge.load()  # a reward-model judge: a broken run fails before any generation time is spent
    cut = [p for p in prompts if p.truncated]
    if cut:
        print(f"generate: warning: {len(cut)} of {len(prompts)} prompts did not fit the run's context of {context} "
              f"tokens and lost their beginning ({'early exchanges' if chat_template else 'tokens'}; the first: "
              f"{cut[0].example.where})", file=sys.stderr)
    longest = max(len(p.tokens) for p in prompts)
    if progress and longest + sampling.max_new_tokens > context:
        print(f"generate: note: the longest prompt ({longest} tokens) plus max_new_tokens={sampling.max_new_tokens} "
              f"can reach beyond the run's context of {context} tokens (data.seq_len), positions it never trained on",
              file=sys.stderr)
    out_path = out_path or default_out_path(run_dir, prompts_spec)

    step = checkpoint_step(run_dir, step)
    run = runs.load_run(run_dir, mesh=mesh, rules=rules, step=step)
    start = time.perf_counter()
    rows, shapes = answer_prompts(run.model, run.params, prompts, sampling, tokenizer, batch_size=batch_size,
                                  seed=seed, shards=shards, use_cache=use_cache,
                                  progress="generate" if progress else None)
    n_tokens, n_batches = sum(len(r["tokens"]) for r in rows), -(-len(prompts) // batch_size)
    seconds = time.perf_counter() - start
    scores = judge_rows(judge, prompts, rows)

    write_jsonl(out_path, rows)

    summary = dict(run=run_dir, step=step, prompts=prompts_spec, out=out_path, count=len(rows), context=context,
                   new_tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / seconds,
                   stopped=sum(r["stopped"] for r in rows), truncated=sum(p.truncated for p in prompts),
                   batches=n_batches, shapes=sorted(shapes), use_cache=use_cache,
                   sampling=dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_k=sampling.top_k, top_p=sampling.top_p, seed=seed))
    if scores:
        summary.update({score_field(judge): float(np.mean(scores)), "scored": len(scores), "judge": judge.name})
    return summary
