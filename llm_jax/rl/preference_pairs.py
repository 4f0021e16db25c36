"""On-policy preference pairs: sample K answers per prompt, have a judge score them, write best against worst.

    llm-jax preference-pairs --run runs/sft --prompts default_task --k 4 --judge gold --out runs/pairs.jsonl \\
        [--pairs best-worst|all] [--min-margin 0.2] [--temperature 1.0 --max-new-tokens 32 ...]
    llm-jax preference-pairs --run runs/sft --prompts default_task --k 8 --judge runs/rm --out pairs.jsonl
    llm-jax preference-pairs --run runs/sft --prompts default_task --k 8 --judge gold --pairs ranking --out r.jsonl

Why on-policy. A reward model learns to rank what it is shown; trained only on pairs made some other way it
never sees the mistakes the policy actually makes, and PPO finds and exploits exactly those. InstructGPT
(Ouyang et al. 2022, §3.5) trains its reward model on labellers' rankings of K samples of the SFT model; online
iterative DPO (Dong et al. 2024, "RLHF Workflow") trains each round on the reward model's best and worst of n
samples of the current policy. Nothing is trained here; the file is `data.train` of configs/reward.py or
configs/dpo.py.

Prompts, sampling and candidates are those of llm_jax/rl/sampling.py, shared with `llm-jax rejection-sample`.
The judge (`--judge`) scores every candidate:

    gold        default_task.gold_score(prompt, answer): the program that defines the embedded task stands in
                for the labellers. It judges only prompts with a "task" key; the others are sampled, counted
                (`unjudged_prompts`) and skipped, and a prompts file without any is an error.
    <run dir>   a reward run's model, scoring each candidate exactly as rejection sampling does; the policy and
                reward runs must share tokenizer and chat template (sampling.check_runs). A run directory
                named gold is ./gold.
    exact_match, regex_match, numeric_match, module:function
                a verifiable judge or a user's (eval/judges.py), on every prompt.

Pairing, per judged prompt. Identical answer texts are merged first (the first one's score kept): the same
answer twice is no comparison, and a record whose chosen equals its rejected is not preference data.

    best-worst  the highest-scoring answer against the lowest (the first of each on ties): one pair at most
    all         every two answers whose scores differ, the higher one chosen: up to K(K-1)/2 pairs
    ranking     one ranking record of the prompt's distinct answers, best first, equal scores tied
                (data/records.py): every pair of `all` in one record, which the reward model's packed rows
                (`reward.layout=packed`) read as one row, the prompt and each answer encoded once

A pair is written only when score(chosen) − score(rejected) ≥ min_margin, and never on equal scores (a tie
states no preference, whatever the margin). A ranking keeps every strict preference: its margin is 0, and another
is refused (near-ties cannot be dropped from a ranking without dropping answers). Differences are compared with a slack of MARGIN_SLACK, so that a gold
1 − 0.8 counts as 0.2. The default margin depends on the judge:

    gold        GOLD_MIN_MARGIN = 0.2, the margin of the embedded task's own preference pairs
                (default_task.MARGIN): it keeps every one-word error against a better answer (1/|gold| ≥ 0.2)
                and drops near-ties, so on-policy pairs follow the rule the offline pairs were made by.
    <run dir>   0: a reward model's scores are Bradley–Terry logits on a scale each run sets, so no fixed margin
                means the same thing across runs; every strict preference is kept, as in RLHF Workflow. A margin d
                keeps the pairs the reward model prefers with probability at least σ(d) (d = 1: 73%); pick
                one from the summary's score spread.

In `all` mode a prompt's pairs share its answers, so they are correlated, yet the reward and DPO stages shuffle
them as independent rows: InstructGPT found that this overfits a reward model within one epoch, and trains on a
prompt's comparisons as one batch element instead (§3.5), which `ranking` with the reward model's packed rows
does. Prefer best-worst or ranking unless `all` is measured to help.

Output, one JSON object a line in prompt order, written whole and then renamed (an earlier file survives a
failed run); records.iter_preference_examples reads it (keys other than prompt, system, chosen and rejected
are ignored):

    prompt, system                  as in the prompts file (a string, "system" if it had one, or messages)
    chosen, rejected                the two answers' texts
    chosen_score, rejected_score    the judge's scores
    responses, ranking, scores      instead of the four above with `ranking`: the distinct answers, their
                                    indices best first (a list for tied ones), the judge's scores
    judge                           the judge's spec: "gold", the reward run directory, ...
    where                           the prompt's file:line

Summary (returned; printed as JSON by the command): the shared counts (`count` prompts, samples, stopped,
candidates and the stopped samples left out), `judged` candidates and `unjudged_prompts`, `pairs` written and
`prompts_with_pairs`, `records` written (= pairs except with ranking, where pairs counts the pairs its records
imply), the judged prompts without a pair by reason (no_pair_fewer_than_two_distinct answers,
no_pair_all_tied, no_pair_below_margin: count = unjudged_prompts + prompts_with_pairs + no_pair), the judge's
mean score over all judged candidates (`score_mean`) and over the written pairs' chosen and rejected answers,
seconds (generation and scoring, compilation included) and samples_per_s. Where prompts have a "task" key,
also gold scores whatever the judge: their mean over all samples, stopped or not (`gold_score`), over the
chosen and the rejected answers of the pairs that have them (`gold_pairs`), and `gold_agreement`, the fraction
of those pairs whose gold scores differ (`gold_decided`) in which the chosen answer has the higher gold
score: how often a reward model's preference is the true one (1.0 by construction for the gold judge).

Sharding: `mesh` and `rules` as in sampling.py.
"""
from __future__ import annotations

import math
from typing import Sequence

from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import write_jsonl
from llm_jax.eval.judges import GoldJudge, load_judge
from llm_jax.rl.sampling import check_sizes, mean, sample_and_judge

PAIRINGS = ("best-worst", "all", "ranking")
GOLD_MIN_MARGIN = 0.2  # default_task.MARGIN (module docstring)
MARGIN_SLACK = 1e-9  # gold scores are ratios of small integers: 1 - 0.8 is 0.19999999999999996
NO_PAIR = ("fewer_than_two_distinct", "all_tied", "below_margin")


def check_options(k: int, min_margin: float | None, pairing: str, batch_size: int) -> None:
    """The options' own checks, before any file is read."""
    check_sizes(k, batch_size, min_k=2, why=" (a pair needs two samples)")
    if min_margin is not None and not (math.isfinite(min_margin) and min_margin >= 0):
        raise ValueError(f"min_margin must be a finite score difference ≥ 0, got {min_margin}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairs must be one of {PAIRINGS}, got {pairing!r}")
    if pairing == "ranking" and min_margin:
        raise ValueError(f"pairs=ranking keeps every strict preference (equal scores tie), so its min_margin is 0; "
                         f"got {min_margin} (a margin applies to best-worst and all)")


def select_pairs(texts: Sequence[str], scores: Sequence[float], pairing: str, min_margin: float
                 ) -> tuple[list[tuple[int, int]], str | None]:
    """(chosen index, rejected index) pairs of one prompt's answers (module docstring), and when there are none
    the reason, one of NO_PAIR."""
    first = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    distinct = list(first.values())
    if len(distinct) < 2:
        return [], "fewer_than_two_distinct"
    score = {i: float(scores[i]) for i in distinct}
    if len(set(score.values())) == 1:
        return [], "all_tied"
    if pairing == "best-worst":
        ordered = [(max(distinct, key=score.get), min(distinct, key=score.get))]  # max/min: the first on ties
    else:
        ordered = [(i, j) if score[i] > score[j] else (j, i)
                   for n, i in enumerate(distinct) for j in distinct[n + 1:] if score[i] != score[j]]
    pairs = [(c, r) for c, r in ordered if score[c] - score[r] >= min_margin - MARGIN_SLACK]
    return pairs, None if pairs else "below_margin"


def ranking_of(texts: Sequence[str], scores: Sequence[float]) -> tuple[list[int], list]:
    """(the distinct answers' indices, their ranking): positions in that list best first, equal scores as one
    list of tied positions, a single position as itself (data/records.py's `ranking`)."""
    first = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    distinct = list(first.values())
    by_score: dict[float, list[int]] = {}
    for position, i in enumerate(distinct):
        by_score.setdefault(float(scores[i]), []).append(position)
    ranking = [by_score[s] if len(by_score[s]) > 1 else by_score[s][0] for s in sorted(by_score, reverse=True)]
    return distinct, ranking


def preference_pairs(policy_run: str, judge: str, prompts_spec: str, out_path: str, k: int,
                     sampling: SamplingConfig, *, pairing: str = "best-worst", min_margin: float | None = None,
                     batch_size: int = 32, seed: int = 0, step: int | None = None, mesh=None, rules=None,
                     progress: bool = True) -> dict:
    """Samples k answers to every prompt with the policy run, has `judge` (a judge spec: "gold", a reward run directory, ...)
    score them, writes the pairs to `out_path` as preference records and returns the summary (module
    docstring). `min_margin` None: the judge's default. `step` picks the policy's checkpoint (default the
    latest); a reward judge is its run's latest."""
    check_options(k, min_margin, pairing, batch_size)
    judge_ = load_judge(judge, batch_size=batch_size)
    if min_margin is None:
        min_margin = GOLD_MIN_MARGIN if isinstance(judge_, GoldJudge) and pairing != "ranking" else 0.0
    sampled = sample_and_judge("preference-pairs", policy_run, judge_, prompts_spec, k, sampling,
                               batch_size=batch_size, seed=seed, step=step, mesh=mesh, rules=rules,
                               progress=progress)

    written, pairs, margins = [], [], []  # pairs: (chosen, rejected) candidates written (a ranking's: all it
    # implies), with the judge's (chosen, rejected) scores of each in `margins`
    no_pair = dict.fromkeys(NO_PAIR, 0)
    prompts_with_pairs = 0
    for p in sampled.prompts:
        if not p.judged:
            continue
        texts = [c.record["response"] for c in p.candidates]
        found, reason = select_pairs(texts, p.scores, "all" if pairing == "ranking" else pairing, min_margin)
        if reason is not None:
            no_pair[reason] += 1
            continue
        prompts_with_pairs += 1
        if pairing == "ranking":
            distinct, ranking = ranking_of(texts, p.scores)
            first = p.candidates[distinct[0]]
            record = {key: value for key, value in first.record.items() if key != "response"}
            record.update(responses=[texts[i] for i in distinct], ranking=ranking,
                          scores=[float(p.scores[i]) for i in distinct], judge=judge, where=first.row["where"])
            written.append(record)
            pairs += [(p.candidates[c], p.candidates[r]) for c, r in found]
            margins += [(float(p.scores[c]), float(p.scores[r])) for c, r in found]
            continue
        for c, r in found:
            chosen, rejected = p.candidates[c], p.candidates[r]
            record = {key: value for key, value in chosen.record.items() if key != "response"}
            record.update(chosen=chosen.record["response"], rejected=rejected.record["response"],
                          chosen_score=float(p.scores[c]), rejected_score=float(p.scores[r]), judge=judge,
                          where=chosen.row["where"])
            written.append(record)
            pairs.append((chosen, rejected))
            margins.append((record["chosen_score"], record["rejected_score"]))
    write_jsonl(out_path, written)

    summary = dict(
        sampled.summary, judge=judge, out=out_path, pairing=pairing, min_margin=min_margin,
        judged=len(sampled.scores()), unjudged_prompts=sum(not p.judged for p in sampled.prompts),
        pairs=len(pairs), records=len(written), prompts_with_pairs=prompts_with_pairs,
        no_pair=sum(no_pair.values()), **{f"no_pair_{reason}": n for reason, n in no_pair.items()},
        score_mean=mean(sampled.scores()), score_chosen=mean(c for c, _ in margins),
        score_rejected=mean(r for _, r in margins))
    if any(p.rendered.scored for p in sampled.prompts):
        gold = [(c.row["gold_score"], r.row["gold_score"]) for c, r in pairs if "gold_score" in c.row]
        decided = [c > r for c, r in gold if c != r]
        summary.update(gold_score=sampled.gold_mean(), gold_score_chosen=mean(c for c, _ in gold),
                       gold_score_rejected=mean(r for _, r in gold), gold_pairs=len(gold),
                       gold_decided=len(decided), gold_agreement=mean(decided))
    return summary
