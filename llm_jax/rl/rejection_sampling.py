"""Rejection sampling (best-of-K): sample K answers per prompt, keep the reward model's best, write SFT data.

    llm-jax rejection-sample --run runs/sft --reward-run runs/rm --prompts default_task --k 8 \\
        --out runs/rs/sft.jsonl [--threshold 0.5] [--temperature 1.0 --max-new-tokens 32 ...]

The post-training round of Llama 2 (Touvron et al. 2023, §3.2.3) and Llama 3 (Dubey et al. 2024, §4.2): the
kept answers are new SFT data (`data.train` of an SFT config), and the model fine-tuned on them samples the next
round. Nothing is trained here; this is generation, scoring and selection.

Prompts. What `llm-jax generate` reads (`generation_io.read_prompts`: jsonl, jsonl.gz or parquet, a glob or a
comma list), or `default_task` for the embedded task's train prompts (`prompts_train.jsonl`). They are rendered
with the policy run's chat template and fitted to its context (`data.seq_len`) exactly as `generate` does.

Sampling. Each prompt is repeated K times in file order, so its K samples share a batch where `batch_size`
allows; batch i samples with key fold_in(key(seed), i) (generation_io.batches): the same prompts, seed, K and
batch size give the same file. The rows of a prompt draw independent tokens, so at temperature > 0 the K
samples differ; at temperature 0 they are K copies of the greedy answer.

Candidates. A sample is a candidate when it stopped (ended with the template's <|end|> or eos before
max_new_tokens, generation_io's `stopped`); a sample cut off at max_new_tokens is an unfinished answer and is
only counted. A stopped sample is also left out (and counted) when its text would not load back as SFT data
(it contains a reserved chat symbol such as <|user|>) or when prompt and answer do not fit the reward model's
context. Each candidate is scored as `chat.render_pair` renders it for the reward model, prompt + answer +
<|end|> + eos with the answer re-encoded from its text: the reward is that of the record as written, the one
`RewardScorer.score(prompt, response)` gives and SFT will train on (a sampled token split can differ from the
tokenizer's own).

Selection. Per prompt the highest-reward candidate (the first on ties); with `threshold` it is kept only if
its reward is ≥ threshold. A prompt without candidates contributes nothing.

Output, one JSON object a line in prompt order, written whole and then renamed (an earlier file survives a
failed run); records.iter_sft_examples reads it (keys other than prompt, system and response are ignored):

    prompt, system   as in the prompts file (a string, with "system" if it had one, or a list of messages)
    response         the kept answer's text
    reward           its reward
    k                samples drawn for the prompt
    candidates       how many of them were candidates
    gold_score       for prompts with a "task" key: default_task.gold_score of the answer
    where, metadata  the prompt's file:line and its other keys

Summary (returned; printed as JSON by the command): counts (`count` prompts, samples, stopped, candidates, the
stopped samples left out, kept, dropped_by_threshold, no_candidate: count = kept + dropped + no_candidate), rewards
(mean over all candidates, over the kept answers, and over one candidate drawn at random for each kept
prompt), with gold scores the same three means (the mean over all samples, stopped or not) plus the best
candidate by gold score (`gold_score_oracle`, the ceiling of any selection), and seconds (generation and
scoring, compilation included) and samples_per_s. Kept against random on the same prompts and candidates shows
what the reward model's choice adds over chance; oracle against kept shows what it misses.

Sharding: with `mesh`, the policy's params are restored on the mesh and every batch fills up to a multiple of
its batch shards (as `generate_file`); the reward model (`reward.load_scorer`) runs on the default device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import numpy as np

from llm_jax import runs, sharding
from llm_jax.data import chat, records
from llm_jax.data.post_training import resolve_spec
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.generate import SamplingConfig, generate
from llm_jax.generation_io import (RenderedPrompt, batch_shards, batches, checkpoint_step, gold_scorer,
                                   read_prompts, response_row)
from llm_jax.objectives import reward
from llm_jax.train.checkpoint import CheckpointError

REWARD_OBJECTIVE = "reward"


def check_options(k: int, threshold: float | None, batch_size: int) -> None:
    """The options' own checks, before any file is read."""
    if k < 1:
        raise ValueError(f"k (samples per prompt) must be ≥ 1, got {k}")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite reward, got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")


def check_runs(policy_run: str, reward_run: str):
    """(policy config, reward config) of two runs that can work together, else a clear error naming them.

    The reward model must read the policy's answers as the policy wrote them: the same tokenizer (the model
    files' bytes) and the same chat template."""
    configs = []
    for role, run_dir in (("policy run", policy_run), ("reward run", reward_run)):
        if not os.path.isdir(run_dir):
            raise CheckpointError(f"{role} directory {run_dir!r} does not exist")
        configs.append(runs.read_config(run_dir))
    policy_config, reward_config = configs
    if reward_config.objective != REWARD_OBJECTIVE:
        raise ValueError(f"reward run {reward_run!r} is not a reward model: its config.objective is "
                         f"{reward_config.objective!r}, expected {REWARD_OBJECTIVE!r}")
    if policy_config.objective == REWARD_OBJECTIVE:
        raise ValueError(f"policy run {policy_run!r} is a reward model (config.objective={REWARD_OBJECTIVE!r}); "
                         f"sample from a language model run (SFT, DPO, ...)")
    tokenizers = [Tokenizer.load(os.path.join(d, "tokenizer.model")) for d in (policy_run, reward_run)]
    if tokenizers[0].sha256 != tokenizers[1].sha256:
        raise ValueError(f"policy run {policy_run!r} and reward run {reward_run!r} use different tokenizers "
                         f"({tokenizers[0]!r} vs {tokenizers[1]!r}): the reward model would misread the answers")
    templates = [c.data.get("chat_template", chat.DEFAULT_TEMPLATE) for c in configs]
    if templates[0] != templates[1]:
        raise ValueError(f"policy run {policy_run!r} uses chat template {templates[0]!r} but reward run "
                         f"{reward_run!r} uses {templates[1]!r} (data.chat_template)")
    return policy_config, reward_config


@dataclasses.dataclass
class _Prompt:
    """One prompt's samples (generation_io rows) and its candidates: (sample index, SFT record, sequence,
    answer start)."""
    rendered: RenderedPrompt
    samples: list = dataclasses.field(default_factory=list)
    candidates: list = dataclasses.field(default_factory=list)
    rewards: np.ndarray | None = None


def _sft_record(row: dict) -> dict:
    record = {"prompt": row["prompt"]}
    if "system" in row:
        record["system"] = row["system"]
    record["response"] = row["response"]
    return record


def _candidate(row: dict, tokenizer: Tokenizer, template: str, reward_max_len: int, counts: dict):
    """(SFT record, reward-model sequence, where its answer starts) of a sample, or None (and a count) when it
    is not a candidate."""
    if not row["stopped"]:
        return None
    record = _sft_record(row)
    try:
        example = records.sft_example(record, row["where"])  # exactly the check SFT loading applies
    except DataError:
        counts["reserved_symbol"] += 1
        return None
    try:
        pair = chat.render_pair(example.messages[:-1], row["response"], row["response"], tokenizer, template,
                                max_len=reward_max_len + 1, where=row["where"])
    except chat.ExampleTooLong:
        counts["too_long_for_reward"] += 1
        return None
    return record, pair.chosen, pair.response_start


def _sample_all(policy: runs.Run, prompts: list[_Prompt], k: int, sampling: SamplingConfig, batch_size: int,
                seed: int, shards: int, gold, progress: bool) -> None:
    """Fills every prompt's `samples` with its k rows, drawn in batches of repeated prompts."""
    tokenizer = policy.tokenizer
    repeated = [p for p in prompts for _ in range(k)]
    rendered = [p.rendered for p in repeated]
    key = jax.random.key(seed)
    n_batches, done, start = -(-len(repeated) // batch_size), 0, time.perf_counter()
    for i, (n, tokens_bp, lengths_b) in enumerate(batches(rendered, batch_size, tokenizer.pad_id, shards)):
        out = generate(policy.model, policy.params, tokens_bp, lengths_b, jax.random.fold_in(key, i), sampling)
        tokens, log_probs, lengths = jax.device_get((out.tokens, out.log_probs, out.lengths))
        for row in range(n):
            repeated[done].samples.append(response_row(rendered[done], tokens[row], log_probs[row],
                                                       int(lengths[row]), sampling.stop_ids, tokenizer, gold))
            done += 1
        if progress:
            print(f"rejection-sample: batch {i + 1}/{n_batches}, {done}/{len(repeated)} samples, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(np.asarray(values, np.float64))) if values else None


def rejection_sample(policy_run: str, reward_run: str, prompts_spec: str, out_path: str, k: int,
                     sampling: SamplingConfig, *, threshold: float | None = None, batch_size: int = 32,
                     seed: int = 0, step: int | None = None, mesh=None, rules=None, progress: bool = True) -> dict:
    """Samples k answers to every prompt with the policy run, keeps the reward run's best of each (at least
    `threshold` when given) and writes them to `out_path` as SFT records; returns the summary (module docstring).

    `step` picks the policy's checkpoint (default the latest); the reward model is its run's latest."""
    check_options(k, threshold, batch_size)
    policy_config, _ = check_runs(policy_run, reward_run)
    if mesh is not None and rules is None:
        rules = sharding.check_rules(policy_config.mesh_rules)
    shards = batch_shards(mesh, rules)
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} does not divide over the mesh's {shards} batch shards")
    tokenizer = Tokenizer.load(os.path.join(policy_run, "tokenizer.model"))
    template = policy_config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
    sampling = dataclasses.replace(sampling, stop_ids=tuple(chat.stop_ids(tokenizer, template)))
    if progress and sampling.temperature == 0.0 and k > 1:
        print(f"rejection-sample: note: temperature 0 (greedy) makes the {k} samples of a prompt identical",
              file=sys.stderr)
    gold = gold_scorer()
    spec = resolve_spec(prompts_spec, "prompts", "train")
    try:
        rendered = read_prompts(spec, tokenizer, template=template, max_len=int(policy_config.data.seq_len),
                                scorer=gold)
    except chat.ExampleTooLong as e:
        raise DataError(f"{e}, the policy run's context (data.seq_len in {policy_run}/config.json)") from e
    prompts = [_Prompt(p) for p in rendered]

    # The reward model first: a broken reward run fails before any sampling time is spent.
    scorer = reward.load_scorer(reward_run, batch_size)
    step = checkpoint_step(policy_run, step)
    policy = runs.load_run(policy_run, mesh=mesh, rules=rules, step=step)
    start = time.perf_counter()
    _sample_all(policy, prompts, k, sampling, batch_size, seed, shards, gold, progress)

    counts = dict(reserved_symbol=0, too_long_for_reward=0)
    for p in prompts:
        for index, row in enumerate(p.samples):
            candidate = _candidate(row, tokenizer, template, scorer.max_len, counts)
            if candidate is not None:
                p.candidates.append((index, *candidate))
    sequences = [c[2] for p in prompts for c in p.candidates]
    if progress:
        print(f"rejection-sample: scoring {len(sequences)} candidates with {reward_run}", file=sys.stderr,
              flush=True)
    rewards = scorer.score_tokens(sequences, [c[3] for p in prompts for c in p.candidates])
    offset = 0
    for p in prompts:
        p.rewards = rewards[offset:offset + len(p.candidates)]
        offset += len(p.candidates)
    seconds = time.perf_counter() - start

    # One draw per prompt with candidates, whatever the threshold: runs that differ only in it compare.
    rng = np.random.default_rng(seed)
    kept, chosen = [], []  # chosen: (best, random draw, candidates' gold scores) of each kept prompt
    dropped = no_candidate = 0
    for p in prompts:
        if not p.candidates:
            no_candidate += 1
            continue
        best, drawn = int(np.argmax(p.rewards)), int(rng.integers(len(p.candidates)))
        if threshold is not None and p.rewards[best] < threshold:
            dropped += 1
            continue
        index, record = p.candidates[best][:2]
        row = p.samples[index]
        record = dict(record, reward=float(p.rewards[best]), k=k, candidates=len(p.candidates))
        if "gold_score" in row:
            record["gold_score"] = row["gold_score"]
        record.update(where=row["where"], metadata=row["metadata"])
        kept.append(record)
        chosen.append((p, best, drawn))

    # Written whole, then renamed: an earlier file of the same name survives a failed run.
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)

    n_samples = len(prompts) * k
    stopped = sum(row["stopped"] for p in prompts for row in p.samples)
    summary = dict(
        policy_run=policy_run, reward_run=reward_run, step=step, prompts=prompts_spec, out=out_path, k=k,
        threshold=threshold, count=len(prompts), samples=n_samples, stopped=stopped, candidates=len(sequences),
        **counts, kept=len(kept), dropped_by_threshold=dropped, no_candidate=no_candidate,
        reward_mean=_mean(rewards), reward_kept=_mean(r["reward"] for r in kept),
        reward_random=_mean(p.rewards[drawn] for p, _, drawn in chosen),
        seconds=seconds, samples_per_s=n_samples / seconds,
        sampling=dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                      top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, batch_size=batch_size))
    scored = [(p, best, drawn) for p, best, drawn in chosen if p.rendered.scored and gold is not None]
    if scored:
        def gold_of(p, candidate):
            return p.samples[p.candidates[candidate][0]]["gold_score"]
        summary.update(
            gold_score=_mean(row["gold_score"] for p in prompts for row in p.samples if "gold_score" in row),
            gold_score_kept=_mean(gold_of(p, best) for p, best, _ in scored),
            gold_score_random=_mean(gold_of(p, drawn) for p, _, drawn in scored),
            gold_score_oracle=_mean(max(gold_of(p, c) for c in range(len(p.candidates))) for p, _, _ in scored),
            scored=len(scored))
    return summary
