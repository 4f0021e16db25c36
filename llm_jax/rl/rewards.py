"""What pays an RL rollout: `rl.reward`'s weighted terms (rl/settings.py), each the reward model or a judge.

    rewards = Rewards(s, tokenizer, stop_ids, mesh, rules, policy_run)
    scored = rewards.score(prompts, tokens_bn, mask_bn)      host arrays in, a `Scored` of host arrays out

A judge is called as `judge.score(prompt records, response texts)` (eval/judges.py's protocol: verifiable
rewards are `module:function` plugins). The reward model, when the run has one (`rl.reward_run`), is read on the
sampled tokens by one jitted program and standardised by the reward run's own eval statistics
(`rl.normalize_score`), which puts its scores on a unit scale so β means the same thing whatever offset it
learned; it is scored and logged (`score`) even when it does not pay.

    reward_b = Σ_j w_j · term_j(x, y)                                  what the eval reports
    paid_b   = reward_b − unfinished_penalty·[y did not stop] (+ overlong_penalty(|y|) with rl.overlong="penalty")

With `rl.reward_shaping="dense"` (one term) the score is also split over the tokens (`dense_bn`, what each
token earned, summing to the score's part that the response's prefixes account for): a "likelihood" reward
model's per-token log-likelihood terms / σ, or a judge's increments over the response's prefixes
(`judge_steps`). The rest is paid at the last token (rl/advantages.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import runs
from llm_jax.data.tokenizer_files import load_tokenizer, run_tokenizer_path
from llm_jax.data.tokenizer_stage import TokenizerMismatch
from llm_jax.eval.judges import GOLD, GoldJudge, JudgeError, applies
from llm_jax.generation_io import decode_response
from llm_jax.objectives import reward
from llm_jax.rl import groups, rollout
from llm_jax.rl.prompts import Prompts, response_texts
from llm_jax.rl.settings import REWARD_MODEL, RLSettings, reward_judge
from llm_jax.train.checkpoint import CheckpointError
from llm_jax.train.metrics import read_metrics
from llm_jax.train.run_record import read_run_config


@dataclasses.dataclass
class Scored:
    """One rollout's rewards, host arrays over its B rows."""
    paid_b: np.ndarray        # float32, what the policy is paid (penalties included)
    reward_b: np.ndarray      # float32, Σ weight·term
    dense_bn: np.ndarray      # float32 (B, N), the parts paid per token (0 without dense shaping)
    stopped_b: np.ndarray     # bool, the response ended with a stop id
    terms: dict               # term spec -> (B,) float32 raw term values
    score_b: np.ndarray | None  # float32 raw reward-model scores, when the run has a reward model
    gold_b: np.ndarray | None   # the embedded task's gold score, paying or not, when it applies to every prompt
    texts: list[str]


def reward_statistics(reward_run: str) -> tuple[float, float]:
    """(mean, std) of the reward model's scores at its last eval: how RL standardises the scores."""
    evals = [m for m in read_metrics(reward_run) if "eval_reward_mean" in m and "eval_reward_std" in m]
    if not evals:
        raise CheckpointError(f"reward run {reward_run!r} logged no eval_reward_mean/eval_reward_std (metrics.jsonl)"
                              "; set rl.normalize_score=False to use its raw scores")
    return float(evals[-1]["eval_reward_mean"]), max(float(evals[-1]["eval_reward_std"]), 1e-6)


def check_tokenizer(field: str, run_dir: str, tokenizer, policy_run: str) -> None:
    """TokenizerMismatch unless the run `field` names (a reference or reward run) has the policy's tokenizer."""
    if load_tokenizer(run_tokenizer_path(run_dir)).sha256 != tokenizer.sha256:
        raise TokenizerMismatch(f"{field}={run_dir!r} has another tokenizer than the policy ({policy_run!r})")


def judged(judge, prompts: Prompts, answers: list[str]) -> np.ndarray | None:
    """The judge's score of every answer, or None unless it applies to every prompt."""
    if not all(applies(judge, r) for r in prompts.records):
        return None
    return judge.score(prompts.records, answers)


def judge_steps(judge, prompts: Prompts, tokenizer, tokens_bn, mask_bn, stop_ids) -> np.ndarray:
    """(B, N) the judge's score's increments over each response's prefixes: entry i is Φ(tokens ≤ i) − Φ(tokens < i)
    with Φ(prefix) = judge score of (prompt, decoded prefix), so a row sums to the whole response's score minus
    that of the empty response (0 for the embedded task's gold judge). A potential-based split (Ng et al. 1999)
    of the score into what each token earned; 0 on padding."""
    steps = np.zeros(tokens_bn.shape, np.float32)
    for b, (record, row, m) in enumerate(zip(prompts.records, tokens_bn, mask_bn)):
        ids = [int(t) for t in row[:int(m.sum())]]
        prefixes = [""] + [decode_response(tokenizer, ids[:i + 1], stop_ids)[0] for i in range(len(ids))]
        potential = judge.score([record] * len(prefixes), prefixes)
        steps[b, :len(ids)] = np.diff(potential)
    return steps


class Rewards:
    """The judges and the reward model of one run (module docstring)."""

    def __init__(self, s: RLSettings, tokenizer, stop_ids, mesh, rules, policy_run: str):
        self.s, self.tokenizer, self.stop_ids = s, tokenizer, tuple(stop_ids)
        self.terms = s.reward_terms
        self.judges = {spec: reward_judge(spec) for spec, _ in self.terms if spec != REWARD_MODEL}
        self.rm_model = self.rm_params = self.rm_cfg = None
        self.mean, self.std = 0.0, 1.0
        if s.reward_run:
            objective = read_run_config(s.reward_run).objective
            if objective != "reward":
                raise CheckpointError(f"rl.reward_run={s.reward_run!r} is a {objective!r} run, not a reward model")
            check_tokenizer("rl.reward_run", s.reward_run, tokenizer, policy_run)
            rm = runs.load_run(s.reward_run, mesh=mesh, rules=rules, model_cls=reward.RewardModel)
            self.rm_model, self.rm_params, self.rm_cfg = rm.model, rm.params, rm.model_cfg
            self.readout = reward.readout_of(rm.config)
            if s.reward_shaping == "dense" and s.uses_reward_model and self.readout != "likelihood":
                raise ValueError(f'rl.reward_shaping="dense" pays each token its part of the score, which a reward '
                                 f'model with readout {self.readout!r} ({s.reward_run}) does not have: use a '
                                 f'"likelihood" reward model, a judge, or rl.reward_shaping="final"')
            if s.normalize_score:
                self.mean, self.std = reward_statistics(s.reward_run)
            self._rm_terms = jax.jit(self._reward_model_terms)

    def check(self, prompts: Prompts, where: str) -> None:
        """ValueError, before the first iteration, unless every judge that pays can judge every prompt and scores
        a trial (two empty answers) as the judge protocol says: one finite number per answer."""
        for spec, judge in self.judges.items():
            for i, record in enumerate(prompts.records):
                if not applies(judge, record):
                    raise ValueError(f"rl.reward term {spec!r} cannot judge prompt {i} of {where} (the gold judge "
                                     'needs default-task prompts with a "task" key)')
            try:
                judge.score(prompts.records[:2], [""] * len(prompts.records[:2]))
            except JudgeError as e:
                raise ValueError(f"rl.reward term {spec!r} on a trial of {where}: {e}") from None

    def _reward_model_terms(self, rm_params, prompt_tokens, prompt_lengths, tokens_bn, mask_bn):
        seqs = rollout.assemble(prompt_tokens, prompt_lengths, tokens_bn, mask_bn)
        return rollout.reward_terms(self.rm_model, rm_params, seqs, self.readout)

    def reward_model_scores(self, prompts: Prompts, tokens_bn, mask_bn):
        """(raw scores (B,), per-token likelihood terms (B, N)) of the reward model; host arrays."""
        head_b, terms_bn = self._rm_terms(self.rm_params, jnp.asarray(prompts.tokens), jnp.asarray(prompts.lengths),
                                          jnp.asarray(tokens_bn), jnp.asarray(mask_bn))
        head_b, terms_bn = np.asarray(jax.device_get(head_b)), np.asarray(jax.device_get(terms_bn))
        return (head_b + terms_bn.sum(axis=1)).astype(np.float32), terms_bn.astype(np.float32)

    def stopped(self, tokens_bn, mask_bn) -> np.ndarray:
        n_b = mask_bn.sum(axis=1).astype(np.int64)
        last_b = tokens_bn[np.arange(len(n_b)), np.maximum(n_b - 1, 0)]
        return (n_b > 0) & np.isin(last_b, np.asarray(self.stop_ids))

    def score(self, prompts: Prompts, tokens_bn, mask_bn) -> Scored:
        s = self.s
        texts = response_texts(self.tokenizer, tokens_bn, mask_bn, self.stop_ids)
        terms, judged_by, dense_bn, score_b = {}, {}, np.zeros(tokens_bn.shape, np.float32), None
        if self.rm_model is not None:
            score_b, rm_terms_bn = self.reward_model_scores(prompts, tokens_bn, mask_bn)
        for spec, weight in self.terms:
            if spec == REWARD_MODEL:
                terms[spec] = (score_b - self.mean) / self.std
                if s.reward_shaping == "dense":
                    dense_bn = weight * rm_terms_bn / self.std
            else:
                judge = self.judges[spec]
                judged_by[spec] = judge.score(prompts.records, texts)
                terms[spec] = np.asarray(judged_by[spec], np.float32)
                if s.reward_shaping == "dense":
                    dense_bn = weight * judge_steps(judge, prompts, self.tokenizer, tokens_bn, mask_bn, self.stop_ids)
        reward_b = sum(weight * terms[spec] for spec, weight in self.terms).astype(np.float32)
        stopped_b = self.stopped(tokens_bn, mask_bn)
        paid_b = reward_b - s.unfinished_penalty * (~stopped_b)
        if s.overlong == "penalty":
            paid_b = paid_b + groups.overlong_penalty(mask_bn.sum(axis=1), s.max_new_tokens, s.overlong_cache)
        # The gold metric is the gold term's own scores when gold pays: each answer judged once.
        gold_b = judged_by[GOLD] if GOLD in judged_by else judged(GoldJudge(), prompts, texts)
        return Scored(paid_b.astype(np.float32), reward_b, dense_bn * mask_bn, stopped_b, terms, score_b, gold_b,
                      texts)
