"""Rejection sampling (best-of-K): sample K answers per prompt, keep the reward model's best, write SFT data.

    llm-jax rejection-sample --run runs/sft --reward-run runs/rm --prompts default_task --k 8 \\
        --out runs/rs/sft.jsonl [--threshold 0.5] [--temperature 1.0 --max-new-tokens 32 ...]

The post-training round of Llama 2 (Touvron et al. 2023, §3.2.3) and Llama 3 (Dubey et al. 2024, §4.2): the
kept answers are new SFT data (`data.train` of an SFT config), and the model fine-tuned on them samples the next
round. Nothing is trained here; this is generation, scoring and selection.

Prompts, sampling and candidates are those of llm_jax/rl/sampling.py (shared with `llm-jax preference-pairs`):
K samples per prompt, the stopped ones that load back as SFT data and fit the reward model's context are the
candidates, each scored as the reward model reads the record as written. `--reward-run` takes any judge of
eval/judges.py: `gold` has the embedded task's program judge instead (the oracle's choice, the ceiling of the
reward model's), and a verifiable judge (exact_match, regex_match, numeric_match) or a user's module:function
picks by its checker; "reward" below is then that judge's score. A run directory named gold is ./gold.

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
stopped samples left out, kept, dropped_by_threshold, no_candidate, and unjudged_prompts, those the gold judge
cannot judge (without a "task" key): count = kept + dropped + no_candidate + unjudged_prompts), rewards
(mean over all candidates, over the kept answers, and over one candidate drawn at random for each kept
prompt), with gold scores the same three means (the mean over all samples, stopped or not) plus the best
candidate by gold score (`gold_score_oracle`, the ceiling of any selection), and seconds (generation and
scoring, compilation included) and samples_per_s. Kept against random on the same prompts and candidates shows
what the reward model's choice adds over chance; oracle against kept shows what it misses.

Sharding: `mesh` and `rules` as in sampling.py.
"""
from __future__ import annotations

import math

import numpy as np

from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import write_jsonl
from llm_jax.eval.judges import load_judge
from llm_jax.rl.sampling import check_sizes, mean, sample_and_judge



def check_options(k: int, threshold: float | None, batch_size: int) -> None:
    """The options' own checks, before any file is read."""
    check_sizes(k, batch_size)
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite reward, got {threshold}")


def rejection_sample(policy_run: str, reward_run: str, prompts_spec: str, out_path: str, k: int,
                     sampling: SamplingConfig, *, threshold: float | None = None, batch_size: int = 32,
                     seed: int = 0, step: int | None = None, mesh=None, rules=None, progress: bool = True) -> dict:
    """Samples k answers to every prompt with the policy run, keeps the reward run's best of each (at least
    `threshold` when given) and writes them to `out_path` as SFT records; returns the summary (module docstring).

    `step` picks the policy's checkpoint (default the latest); the reward model is its run's latest.
    `reward_run` may name any judge (eval/judges.py load_judge; module docstring)."""
    check_options(k, threshold, batch_size)
    judge = load_judge(reward_run, batch_size=batch_size)
    sampled = sample_and_judge("rejection-sample", policy_run, judge, prompts_spec, k, sampling,
                               batch_size=batch_size, seed=seed, step=step, mesh=mesh, rules=rules,
                               progress=progress)

    # One draw per prompt with candidates, whatever the threshold: runs that differ only in it compare.
    rng = np.random.default_rng(seed)
    kept, chosen = [], []  # chosen: (prompt, best, random draw) of each kept prompt
    dropped = no_candidate = unjudged = 0
    for p in sampled.prompts:
        if not p.judged:  # the gold judge, on a prompt without a "task" key
            unjudged += 1
            continue
        if not p.candidates:
            no_candidate += 1
            continue
        best, drawn = int(np.argmax(p.scores)), int(rng.integers(len(p.candidates)))
        if threshold is not None and p.scores[best] < threshold:
            dropped += 1
            continue
        candidate = p.candidates[best]
        record = dict(candidate.record, reward=float(p.scores[best]), k=k, candidates=len(p.candidates))
        if "gold_score" in candidate.row:
            record["gold_score"] = candidate.row["gold_score"]
        record.update(where=candidate.row["where"], metadata=candidate.row["metadata"])
        kept.append(record)
        chosen.append((p, best, drawn))
    write_jsonl(out_path, kept)

    summary = dict(
        sampled.summary, reward_run=reward_run, judge=judge.name, out=out_path, threshold=threshold,
        kept=len(kept), dropped_by_threshold=dropped, no_candidate=no_candidate, unjudged_prompts=unjudged,
        reward_mean=mean(sampled.scores()),
        reward_kept=mean(r["reward"] for r in kept),
        reward_random=mean(p.scores[drawn] for p, _, drawn in chosen))
    scored = [(p, best, drawn) for p, best, drawn in chosen if p.rendered.scored]
    if scored:
        def gold_of(p, candidate):
            return p.candidates[candidate].row["gold_score"]
        summary.update(
            gold_score=sampled.gold_mean(),
            gold_score_kept=mean(gold_of(p, best) for p, best, _ in scored),
            gold_score_random=mean(gold_of(p, drawn) for p, _, drawn in scored),
            gold_score_oracle=mean(max(gold_of(p, c) for c in range(len(p.candidates))) for p, _, _ in scored),
            scored=len(scored))
    return summary
