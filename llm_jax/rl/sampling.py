"""K samples per prompt from a policy run, the stopped ones kept as candidates, every candidate judged.

The core of `llm-jax rejection-sample` (rejection_sampling.py: the judge's best of K becomes SFT data) and
`llm-jax preference-pairs` (preference_pairs.py: the judge's best against its worst becomes preference data).
Both need the same candidates scored the same way, so that a reward model trained on the pairs judges what
rejection sampling later selects from.

Prompts. What `llm-jax generate` reads (`generation_io.read_prompts`: jsonl, jsonl.gz or parquet, a glob or a
comma list), or `default_task` for the embedded task's train prompts (`prompts_train.jsonl`). They are rendered
with the policy run's chat template and fitted to its context (`data.seq_len`) exactly as `generate` does.

Sampling. Each prompt is repeated K times in file order, so its K samples share a batch where `batch_size`
allows; batch i samples with key fold_in(key(seed), i) (generation_io.batches): the same prompts, seed, K and
batch size give the same samples. The rows of a prompt draw independent tokens, so at temperature > 0 the K
samples differ; at temperature 0 they are K copies of the greedy answer.

Candidates. A sample is a candidate when it stopped (ended with the template's <|end|> or eos before
max_new_tokens, generation_io's `stopped`); a sample cut off at max_new_tokens is an unfinished answer and is
only counted. A stopped sample is also left out (and counted) when its text would not load back as data
(it contains a reserved chat symbol such as <|user|>: `reserved_symbol`) or, with a reward-model judge, when
prompt and answer do not fit the reward model's context (`too_long_for_reward`).

Judges (eval/judges.py, any `load_judge` spec) score every candidate of the prompts they apply to, in one
`judge.score(prompt records, responses)` call:

    a reward run          its model, on each candidate as `chat.render_pair` renders it for the reward model
                          (prompt + answer + <|end|> + eos, the answer re-encoded from its text): the score of the
                          record as written, the one a later stage trains on (a sampled token split can differ
                          from the tokenizer's own). The policy and reward runs must fit together (`check_runs`).
    gold                  `default_task.gold_score(last user turn, answer)`, the program that defines the
                          embedded task; it can judge only prompts with a "task" key (the others are sampled and
                          counted but not judged), and a prompts file without any is an error.
    exact_match, ...      a verifiable judge or a user's module:function, on every prompt.

Whatever the judge, every sample of a "task" prompt also gets its `gold_score` (the gold judge's), so a run
judged by a reward model is measured against the task's truth.

Sharding: with `mesh`, the policy's params are restored on the mesh and every batch fills up to a multiple of
its batch shards (as `generate_file`); the reward model (`reward.load_scorer`) runs on the default device.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

from llm_jax import runs
from llm_jax.train import run_record
from llm_jax.data import chat, records
from llm_jax.data.post_training import resolve_spec
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer_files import load_tokenizer, run_tokenizer_path
from llm_jax.eval.judges import GoldJudge, RewardModelJudge, applies
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import (RenderedPrompt, answer_prompts, checkpoint_step, judge_rows, prepare_sampling,
                                   read_prompts)
from llm_jax.train.checkpoint import CheckpointError

REWARD_OBJECTIVE = "reward"


def check_sizes(k: int, batch_size: int, min_k: int = 1, why: str = "") -> None:
    """The size options' own checks, before any file is read; `why` says what needs `min_k` samples."""
    if k < min_k:
        raise ValueError(f"k (samples per prompt) must be ≥ {min_k}{why}, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")


def _run_config(run_dir: str, role: str):
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{role} directory {run_dir!r} does not exist")
    return run_record.read_run_config(run_dir)


def check_policy_run(policy_run: str):
    """The policy run's config, else a clear error: a missing directory, or a reward model (it cannot sample)."""
    config = _run_config(policy_run, "policy run")
    if config.objective == REWARD_OBJECTIVE:
        raise ValueError(f"policy run {policy_run!r} is a reward model (config.objective={REWARD_OBJECTIVE!r}); "
                         f"sample from a language model run (SFT, DPO, ...)")
    return config


def check_runs(policy_run: str, reward_run: str):
    """(policy config, reward config) of two runs that can work together, else a clear error naming them.

    The reward model must read the policy's answers as the policy wrote them: the same tokenizer (the model
    files' bytes) and the same chat template."""
    policy_config = check_policy_run(policy_run)
    reward_config = _run_config(reward_run, "reward run")
    if reward_config.objective != REWARD_OBJECTIVE:
        raise ValueError(f"reward run {reward_run!r} is not a reward model: its config.objective is "
                         f"{reward_config.objective!r}, expected {REWARD_OBJECTIVE!r}")
    tokenizers = [load_tokenizer(run_tokenizer_path(d)) for d in (policy_run, reward_run)]
    if tokenizers[0].sha256 != tokenizers[1].sha256:
        raise ValueError(f"policy run {policy_run!r} and reward run {reward_run!r} use different tokenizers "
                         f"({tokenizers[0]!r} vs {tokenizers[1]!r}): the reward model would misread the answers")
    templates = [c.data.get("chat_template", chat.DEFAULT_TEMPLATE) for c in (policy_config, reward_config)]
    if templates[0] != templates[1]:
        raise ValueError(f"policy run {policy_run!r} uses chat template {templates[0]!r} but reward run "
                         f"{reward_run!r} uses {templates[1]!r} (data.chat_template)")
    return policy_config, reward_config


def check_judge(policy_run: str, judge):
    """The policy run's config, checked to sample for `judge` (a reward model must fit it: `check_runs`)."""
    if isinstance(judge, RewardModelJudge):
        return check_runs(policy_run, judge.name)[0]
    return check_policy_run(policy_run)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A stopped sample that loads back as data: its generation_io row and its SFT record (prompt, system,
    response)."""
    row: dict
    record: dict


@dataclasses.dataclass
class Prompt:
    """One prompt's K samples (generation_io rows), its candidates and the judge's score of each."""
    rendered: RenderedPrompt
    judged: bool
    samples: list[dict] = dataclasses.field(default_factory=list)
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    scores: np.ndarray | None = None  # (len(candidates),) when judged


def _candidate(row: dict, prompt: RenderedPrompt, judge, counts: dict) -> Candidate | None:
    """The sample as a candidate, or None (and a count) when it is not one."""
    if not row["stopped"]:
        return None
    record = {"prompt": row["prompt"]}
    if "system" in row:
        record["system"] = row["system"]
    record["response"] = row["response"]
    try:
        example = records.sft_example(record, row["where"])  # exactly the check data loading applies
    except DataError:
        counts["reserved_symbol"] += 1
        return None
    fits = getattr(judge, "fits", None)
    if fits is not None and not fits(prompt.record, example.messages[-1].content):
        counts["too_long_for_reward"] += 1
        return None
    return Candidate(row, record)


def _sample_all(command: str, policy: runs.Run, prompts: list[Prompt], k: int, sampling: SamplingConfig,
                batch_size: int, seed: int, shards: int, progress: bool) -> None:
    """Fills every prompt's `samples` with its k rows, drawn in batches of repeated prompts, each "task"
    prompt's rows gold-scored."""
    repeated = [p for p in prompts for _ in range(k)]
    rendered = [p.rendered for p in repeated]
    rows, _ = answer_prompts(policy.model, policy.params, rendered, sampling, policy.tokenizer,
                             batch_size=batch_size, seed=seed, shards=shards, progress=command if progress else None)
    judge_rows(GoldJudge(), rendered, rows)
    for prompt, row in zip(repeated, rows):
        prompt.samples.append(row)


def mean(values) -> float | None:
    values = list(values)
    return float(np.mean(np.asarray(values, np.float64))) if values else None


@dataclasses.dataclass
class Sampled:
    """What `sample_and_judge` returns: the prompts with their samples, candidates and scores, and what the
    commands' summaries share."""
    prompts: list[Prompt]
    summary: dict  # policy_run, step, prompts, k, counts (module docstring), seconds, samples_per_s, sampling

    def scores(self) -> np.ndarray:
        """The judge's scores of every judged candidate, in prompt order."""
        return np.concatenate([np.zeros(0), *(p.scores for p in self.prompts if p.judged)])

    def gold_mean(self) -> float | None:
        """The mean gold score over all samples that have one, stopped or not."""
        return mean(row["gold_score"] for p in self.prompts for row in p.samples if "gold_score" in row)


def sample_and_judge(command: str, policy_run: str, judge, prompts_spec: str, k: int, sampling: SamplingConfig,
                     *, batch_size: int, seed: int, step: int | None, mesh, rules, progress: bool) -> Sampled:
    """Samples k answers to every prompt with the policy run and has `judge` score the candidates (module
    docstring); `step` picks the policy's checkpoint (default the latest), a reward judge is its run's latest."""
    policy_config = check_judge(policy_run, judge)
    rules, shards, tokenizer, template, sampling = prepare_sampling(policy_run, policy_config, sampling,
                                                                    batch_size, mesh, rules)
    if progress and sampling.temperature == 0.0 and k > 1:
        print(f"{command}: note: temperature 0 (greedy) makes the {k} samples of a prompt identical",
              file=sys.stderr)
    spec = resolve_spec(prompts_spec, "prompts", "train")
    try:
        rendered = read_prompts(spec, tokenizer, template=template, max_len=int(policy_config.data.seq_len),
                                judge=GoldJudge())
    except chat.ExampleTooLong as e:
        raise DataError(f"{e}, the policy run's context (data.seq_len in {policy_run}/config.json)") from e
    prompts = [Prompt(p, applies(judge, p.record)) for p in rendered]
    if not any(p.judged for p in prompts):
        raise DataError(f"{prompts_spec}: judge {judge.name!r} can judge none of its {len(prompts)} prompts "
                        f"(the gold judge needs records with a 'task' key)")

    # The judge first: a broken reward run fails before any sampling time is spent.
    if hasattr(judge, "load"):
        judge.load()
    step = checkpoint_step(policy_run, step)
    policy = runs.load_run(policy_run, mesh=mesh, rules=rules, step=step)
    start = time.perf_counter()
    _sample_all(command, policy, prompts, k, sampling, batch_size, seed, shards, progress)

    counts = dict(reserved_symbol=0, too_long_for_reward=0)
    for p in prompts:
        p.candidates = [c for c in (_candidate(row, p.rendered, judge, counts) for row in p.samples)
                        if c is not None]
    judged = [(p, c) for p in prompts if p.judged for c in p.candidates]
    if progress:
        print(f"{command}: scoring {len(judged)} candidates with judge {judge.name}", file=sys.stderr, flush=True)
    scores, offset = judge.score([p.rendered.record for p, _ in judged], [c.row["response"] for _, c in judged]), 0
    for p in (p for p in prompts if p.judged):
        p.scores = scores[offset:offset + len(p.candidates)]
        offset += len(p.candidates)
    seconds = time.perf_counter() - start

    n_samples = len(prompts) * k
    summary = dict(
        policy_run=policy_run, step=step, prompts=prompts_spec, k=k, count=len(prompts), samples=n_samples,
        stopped=sum(row["stopped"] for p in prompts for row in p.samples),
        candidates=sum(len(p.candidates) for p in prompts), **counts, seconds=seconds,
        samples_per_s=n_samples / seconds,
        sampling=dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                      top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, batch_size=batch_size))
    return Sampled(prompts, summary)
