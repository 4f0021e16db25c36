"""The RL loop on the run harness: sample, score, estimate advantages, update; evaluate, checkpoint, resume.

    run(config, workdir) -> summary       (`llm-jax train` with objective "rl"; settings in rl/settings.py)

Iteration i (1-based; `train.steps` of them):
1. **rollout**: the i-th block of `rl.rollout_batch / k` prompts of a per-epoch permutation of the prompt file,
   each sampled k = `rl.samples_per_prompt` times in a row (a group), key fold_in(seed, i) (rl/rollout_engine.py:
   static batches, or continuous batching with `rl.rollout="continuous"`);
2. **reward**: rl/rewards.py, on the host (judges) and in one jitted program (the reward model). With
   `rl.dynamic_sampling` (DAPO) groups whose paid scores are all equal carry no signal: they are dropped and
   further rounds of prompts (rl/prompts.py refill_prompts) are sampled until the batch is full or
   `rl.max_sampling_rounds` is reached (the rest is filled with dropped groups, which add nothing but their KL
   and entropy terms); `dropped_groups`, `sampling_rounds` and `filled_groups` say how it went;
3. **score**: one jitted program: the trainer's log-probs of the samples (`old_logp`), the reference's, the value
   model's values when the estimator needs one, the per-token KL estimate, and the advantages of the estimator
   `rl.estimator` names (rl/advantages.py), whitened with `rl.whiten_advantages`;
4. **update**: `rl.epochs` shuffled passes of minibatch updates of the policy (rl/update.py) and of the value
   model.
Everything is a pure function of (seed, i) and the checkpointed states, so a resumed run continues bit for bit.

Checkpoints are labelled by iteration: the policy's under `<workdir>/checkpoints/` (so `llm-jax generate --run
<workdir>` and a later stage's `train.init_from` read the policy), the value model's (when there is one) under
`<workdir>/value/checkpoints/`, and the KL coefficient (and with PPO-ptx the pretraining stream's position)
beside the policy's (train/harness.py CheckpointSet).

Metrics each iteration, the same for every algorithm:
- `reward` (Σ weight·term), `paid` (after penalties), `reward_<term>` per term, `score` (the reward model's raw
  score, when the run has one), `gold` (the embedded task's gold judge, when the prompts carry a task);
- `kl` (Σ_t k1 per response: log π_old − log π_ref, an unbiased estimate of KL(π‖π_ref) on samples of π),
  `kl_coef` (β in the reward), `kl_term` (the loss's KL estimator, `rl.kl_loss_estimator`), `entropy`;
- off-policy honesty: `logp_mismatch_mean` / `logp_mismatch_max`, |log π_sampler − log π_trainer| over the
  sampled tokens (the generator's log-probs against the trainer's recomputation; ~0 in float32 with the same
  code, not in bf16), and with `rl.tis_cap` the truncated importance weights (`tis_weight`, `tis_capped`);
- `clip_fraction` (`_low`, `_high`), `approx_kl`, `policy_loss`, `ptx_loss`, `value_loss`,
  `value_clip_fraction`, `explained_variance`, `response_length`, `stopped`;
- per role (generate, reward, score, train) the seconds and the MFU.
Evaluation, at iteration 0 and every `train.eval_every`: on `rl.n_eval_prompts` held-out prompts, greedy answers
and one sampled answer each: `eval_reward(_greedy)`, `eval_gold(_greedy)`, `eval_score(_greedy)`, `eval_kl`,
`eval_response_length(_greedy)`.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.data import chat
from llm_jax.data.mixture import build_lm_data
from llm_jax.data.tokenizer_stage import prepare_tokenizer
from llm_jax.eval.judges import GoldJudge
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import batch_shards, padding_id
from llm_jax.model import lora
from llm_jax.model.transformer import Transformer
from llm_jax.objectives import reward
from llm_jax.rl import advantages, groups, losses, rollout, rollout_engine
from llm_jax.rl.policy_loss import logprob_mismatch
from llm_jax.rl.prompts import Prompts, iteration_prompts, refill_prompts
from llm_jax.rl.rewards import Rewards, check_tokenizer
from llm_jax.rl.settings import settings
from llm_jax.rl.update import PTX_PREFIX, make_policy_loss_fn, make_value_loss_fn
from llm_jax.scaling import flops
from llm_jax.train import hardware, memory, run_record
from llm_jax.train import step as train_step
from llm_jax.train.checkpoint import Checkpointer, carries_adapters, run_prompt_tokens, start_params
from llm_jax.train.guard import TrainingDiverged
from llm_jax.train.harness import CheckpointSet, Harness
from llm_jax.train.loop import validate
from llm_jax.train.metrics import log_line, read_metrics
from llm_jax.train.optimizer import make_optimizer, trainable_rule
from llm_jax.train.state import create_state, state_shardings

def host(x) -> np.ndarray:
    """A global array's full value on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _local_rows(rows: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """Global rows (every process holds all of them) as arrays sharded over the batch axes."""
    n, pi, pc = len(next(iter(rows.values()))), jax.process_index(), jax.process_count()
    return sharding.global_batch_from_local({k: v[pi * n // pc:(pi + 1) * n // pc] for k, v in rows.items()},
                                            mesh, rules)


class RL:
    """The models, their states and the jitted programs of one RL run."""

    def __init__(self, config, workdir: str, resuming: bool):
        self.config, self.workdir = config, workdir
        self.s = s = settings(config)
        self.model_cfg = validate(config)
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.check_rules(config.mesh_rules)
        shards = batch_shards(self.mesh, self.rules)
        if s.minibatch % shards or s.rollout_batch % shards or (s.ptx_coef > 0 and s.ptx_batch % shards):
            raise sharding.ShardingError(f"rl.minibatch={s.minibatch}, rl.rollout_batch={s.rollout_batch} and "
                                         f"(with ptx) rl.ptx_batch={s.ptx_batch} must divide over the mesh's "
                                         f"{shards} batch shards")
        self.tokenizer = prepare_tokenizer(config, workdir, vocab_size=self.model_cfg.vocab_size, fresh=not resuming)
        if s.reference_run != config.train.init_from:
            check_tokenizer("rl.reference_run", s.reference_run, self.tokenizer, config.train.init_from)
        self.template = config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
        self.stop_ids = tuple(chat.stop_ids(self.tokenizer, self.template))
        self.sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                       top_p=s.top_p, stop_ids=self.stop_ids)
        max_prompt = int(config.data.seq_len) - s.max_new_tokens
        train = Prompts.read(s.prompts, "train", self.tokenizer, self.template, max_prompt, judge=GoldJudge())
        evals = Prompts.read(s.eval_prompts, "eval", self.tokenizer, self.template, max_prompt, s.n_eval_prompts,
                             judge=GoldJudge())
        width = max(train.tokens.shape[1], evals.tokens.shape[1])  # one compiled shape for training and evals
        self.prompts, self.eval_prompts = (p.padded(width, padding_id(self.tokenizer)) for p in (train, evals))
        self.seq_len = width + s.max_new_tokens
        self.rewards = Rewards(s, self.tokenizer, self.stop_ids, self.mesh, self.rules, config.train.init_from)
        self.rewards.check(self.prompts, f"rl.prompts={s.prompts!r}")
        self.rewards.check(self.eval_prompts, f"rl.eval_prompts={s.eval_prompts!r}")
        self.ptx_data = self._ptx_data() if s.ptx_coef > 0 else None
        self._build_models()
        self._build_programs()
        self.engine = rollout_engine.RolloutEngine(self.policy, s, self.sampling)

    def _ptx_data(self):
        """PPO-ptx's pretraining rows: `rl.ptx_data` packed at data.seq_len, ptx_batch rows per update, as a
        checkpointed grain stream (saved with the policy, so a resumed run reads the same rows)."""
        data = self.config.data.copy_and_resolve_references()
        data.update(train=self.s.ptx_data, eval="", batch_size=self.s.ptx_batch)
        return build_lm_data(data, self.tokenizer, cache_dir=data.cache_dir or os.path.join(self.workdir, "data"),
                             seed=self.config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())

    def ptx_rows(self, iterator) -> dict[str, jax.Array]:
        """The next pretraining rows, `ptx_`-prefixed and sharded over the batch axes."""
        rows = sharding.global_batch_from_local(next(iterator), self.mesh, self.rules)
        return {PTX_PREFIX + k: v for k, v in rows.items()}

    # ------------------------------------------------------------------------------------------ models

    def _build_models(self):
        s, cfg, mesh, rules, config = self.s, self.model_cfg, self.mesh, self.rules, self.config
        self.policy = Transformer(cfg, mesh, rules)
        total = config.train.steps * s.updates_per_iteration
        trainable = trainable_rule(cfg, config.optim)
        self.policy_opt, self.policy_schedule = make_optimizer(config.optim, total, trainable)
        dummy = jnp.zeros((1, self.seq_len), jnp.int32)
        self.init_policy = lambda key: self.policy.init(key, dummy, method=Transformer.logits)
        self.policy_abstract, self.policy_sh = state_shardings(self.init_policy, self.policy_opt, mesh, rules)
        self.value_model = None
        if s.value_model:  # only an estimator that needs one (gae) has a value model
            self.value_model = reward.RewardModel(cfg, mesh, rules)
            value_optim = config.optim.copy_and_resolve_references()
            if s.value_lr > 0:
                value_optim.lr = s.value_lr
            self.value_opt, self.value_schedule = make_optimizer(value_optim, total, trainable)
            self.init_value = lambda key: self.value_model.init(key, dummy, method=Transformer.logits)
            self.value_abstract, self.value_sh = state_shardings(self.init_value, self.value_opt, mesh, rules)
        # The reference: a LoRA policy's own base weights (adapters left out: one shared copy, quantized or
        # not), else a run. A policy whose adapters continue those of a run on the same quantized base starts as
        # base + those adapters, so that is its reference: the shared base and a copy of the adapters alone.
        # A soft prompt is the reference's only where its run trained one (a frozen copy, as those adapters),
        # never the policy's own: a fresh soft prompt is not part of the model the policy started from.
        self.ref_params = self.ref_adapters = None
        if not cfg.lora_rank:
            run_record.check_lineage(config, s.reference_run)
            ref_cfg = dataclasses.replace(lora.without_lora(cfg),
                                          prompt_tuning_tokens=run_prompt_tokens(s.reference_run))
            self.ref_params = start_params(s.reference_run, self.policy_abstract.params, ref_cfg)
        else:
            carried = carries_adapters(config.train.init_from, cfg)
            init_prompt = run_prompt_tokens(config.train.init_from)
            ref_cfg = dataclasses.replace(cfg if carried else lora.without_lora(cfg), prompt_tuning_tokens=init_prompt)
            if carried or init_prompt:
                start = start_params(config.train.init_from, self.policy_abstract.params, cfg)
                self.ref_adapters = lora.split(start)[0]  # the carried adapters and soft prompt
        self.ref_model = Transformer(ref_cfg, mesh, rules)

    def abstract_states(self) -> dict:
        out = dict(policy=self.policy_abstract)
        if self.value_model is not None:
            out["value"] = self.value_abstract
        return out

    def fresh_states(self) -> dict:
        s, config = self.s, self.config
        run_record.check_lineage(config, config.train.init_from)
        params = start_params(config.train.init_from, self.policy_abstract.params, self.model_cfg)
        states = dict(policy=create_state(self.init_policy, self.policy_opt, self.policy_sh, config.seed, params))
        if self.value_model is not None:
            value_run = s.reward_run if s.value_from == "reward" else config.train.init_from
            run_record.check_lineage(config, value_run)
            value_params = reward.params_from_run(value_run, self.value_abstract.params, self.model_cfg)
            states["value"] = create_state(self.init_value, self.value_opt, self.value_sh, config.seed + 1,
                                           value_params)
        return states

    def reference_params(self, policy_params):
        if self.ref_params is not None:
            return self.ref_params
        base = lora.without_adapters(policy_params)
        return base if self.ref_adapters is None else lora.combine(base, self.ref_adapters)

    # ---------------------------------------------------------------------------------------- programs

    def _build_programs(self):
        s, replicated = self.s, sharding.replicated(self.mesh)
        policy_step = train_step.make_train_step(make_policy_loss_fn(self.policy, s), self.policy_opt,
                                                 self.policy_schedule)
        self.policy_step = jax.jit(policy_step, in_shardings=(self.policy_sh, None),
                                   out_shardings=(self.policy_sh, replicated), donate_argnums=0)
        if self.value_model is not None:
            value_step = train_step.make_train_step(make_value_loss_fn(self.value_model, s), self.value_opt,
                                                    self.value_schedule)
            self.value_step = jax.jit(value_step, in_shardings=(self.value_sh, None),
                                      out_shardings=(self.value_sh, replicated), donate_argnums=0)
        self.score = jax.jit(self._score_rollout)
        self.eval_kl = jax.jit(self._eval_kl)

    def _score_rollout(self, policy_params, ref_params, value_params, rows: dict, beta):
        """Everything one iteration's updates need, in one program: log-probs, values, KL, advantages."""
        s = self.s
        seqs = rollout.assemble(rows["prompt_tokens"], rows["prompt_lengths"], rows["tokens"], rows["mask"])
        loss_mask = rows["loss_mask"]
        old_logp = rollout.response_log_probs(self.policy, policy_params, seqs)
        ref_logp = rollout.response_log_probs(self.ref_model, ref_params, seqs)
        values = None if value_params is None else rollout.values(self.value_model, value_params, seqs)
        kl_bn = losses.kl_estimate(old_logp, ref_logp, s.kl_estimator) * seqs.mask_bn
        dense = rows["dense"] if s.reward_shaping == "dense" else None
        estimated = advantages.get_estimator(s.estimator)(advantages.AdvantageInputs(
            scores_b=rows["paid"], mask_bt=loss_mask, kl_bt=kl_bn, beta=beta, values_bt=values, dense_bt=dense,
            group=s.samples_per_prompt, gamma=s.gamma, lam=s.lam))
        advantages_bn = estimated.advantages_bt
        if s.whiten_advantages:
            advantages_bn = losses.whiten(advantages_bn, loss_mask)
        batch = dict(tokens=seqs.tokens_bl, segment_ids=seqs.segment_ids_bl, index=seqs.index_bn,
                     response=seqs.response_bn, mask=seqs.mask_bn, loss_mask=loss_mask, old_logp=old_logp,
                     ref_logp=ref_logp, sampler_logp=rows["sampler_logp"] * seqs.mask_bn, advantages=advantages_bn)
        k1_b = jnp.sum((old_logp - ref_logp) * seqs.mask_bn, axis=1)
        # The sampler's log-probs are of softmax(logits / T): compared at T = 1 only, where they are π's own.
        mismatch = logprob_mismatch(rows["sampler_logp"], old_logp, seqs.mask_bn)
        stats = dict(kl=jnp.mean(k1_b), response_length=jnp.mean(jnp.sum(seqs.mask_bn, axis=1)),
                     logp_mismatch_mean=mismatch["mean_abs"], logp_mismatch_max=mismatch["max_abs"])
        if values is not None:
            batch.update(old_values=values, returns=estimated.returns_bt)
            stats["explained_variance"] = losses.explained_variance(values, estimated.returns_bt, loss_mask)
        return batch, stats

    def _eval_kl(self, policy_params, ref_params, prompt_tokens, prompt_lengths, tokens, mask):
        seqs = rollout.assemble(prompt_tokens, prompt_lengths, tokens, mask)
        return jnp.sum(rollout.response_log_probs(self.policy, policy_params, seqs)
                       - rollout.response_log_probs(self.ref_model, ref_params, seqs), axis=1)

    # ------------------------------------------------------------------------------------------- flops

    def role_flops(self, n_rows: int, decode_steps: int, sampled_rows: int) -> dict[str, float]:
        """FLOPs of one iteration per role, by the 6N (+ attention) count of `scaling.flops` over the tokens each
        role processes. Generation prefills the prompts and decodes `decode_steps` tokens a row, over every
        sampled row (dynamic sampling samples more than it keeps). The reward model reads every sampled row.
        Scoring is a forward of the policy, the reference and the value model (when there is one) over whole
        sequences, with the LM head read at the N response positions only (and not at all for the value model).
        Training is forward + backward (3×) of the policy and the value model, `rl.epochs` times, plus with
        PPO-ptx forward + backward of the policy over `rl.ptx_batch` pretraining rows per update."""
        cfg, length, n_new = self.model_cfg, self.seq_len, self.s.max_new_tokens
        fwd = flops.forward_flops_per_token(cfg, length)
        head = 2 * cfg.d_model * cfg.vocab_size  # per position where the LM head runs
        trunk = n_rows * length * (fwd - head)
        policy_fwd = trunk + n_rows * n_new * head
        value_fwd = trunk if self.value_model is not None else 0
        prompt_width = self.prompts.tokens.shape[1]
        ptx_len = int(self.config.data.seq_len)
        ptx = 0 if self.ptx_data is None else (self.s.updates_per_iteration * self.s.ptx_batch * ptx_len
                                               * flops.forward_flops_per_token(cfg, ptx_len))
        rm = self.rewards.rm_cfg
        return dict(generate=sampled_rows * (prompt_width + decode_steps) * fwd,
                    reward=0 if rm is None else sampled_rows * length * flops.forward_flops_per_token(rm, length),
                    score=2 * policy_fwd + value_fwd,
                    train=self.s.epochs * 3 * (policy_fwd + value_fwd) + 3 * ptx)


class Iterations:
    """The RL loop's iterations on the harness (train/harness.py `Loop`)."""

    eval_at_start = True

    def __init__(self, p: RL, states: dict, checkpoints: CheckpointSet | None, kl_control, ptx_iterator,
                 peak: float):
        """`checkpoints` None: iterations that are never saved (a benchmark's)."""
        self.p, self.states, self.checkpoints = p, states, checkpoints
        self.kl_control, self.ptx_iterator, self.peak = kl_control, ptx_iterator, peak
        self.total = p.config.train.steps
        self.key = jax.random.key(p.config.seed)
        self.checkpoint_dir = None if checkpoints is None else checkpoints.directory
        self.last_saved = None if checkpoints is None else checkpoints.main.latest_step()
        self.logged: dict = {}
        self.memory_metrics: dict = {}  # the policy update's per-device bytes, for the run's first row

    # ------------------------------------------------------------------------------------------ rollout

    def _sample(self, index: np.ndarray, key) -> tuple[dict, float, float, int]:
        """One round: the prompts `index` (each k times in a row), sampled and rewarded -> (rows, seconds
        generating, seconds rewarding, decode steps)."""
        p, k = self.p, self.p.s.samples_per_prompt
        index = np.repeat(index, k)
        prompts = p.prompts.take(index)
        t0 = time.perf_counter()
        gen = p.engine.generate(self.states["policy"].params, prompts.tokens, prompts.lengths, key)
        tokens, mask, logp = host(gen.tokens), host(gen.mask), host(gen.log_probs)
        generating = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = p.rewards.score(prompts, tokens, mask)
        rows = dict(prompt_index=index, prompt_tokens=prompts.tokens, prompt_lengths=prompts.lengths, tokens=tokens,
                    mask=mask, sampler_logp=logp, paid=scored.paid_b, reward=scored.reward_b, dense=scored.dense_bn,
                    stopped=scored.stopped_b,
                    # NaN where gold does not judge the round's prompts: the metric is logged only without NaN
                    gold=np.full(len(index), np.nan) if scored.gold_b is None else scored.gold_b)
        rows.update({f"term:{spec}": value for spec, value in scored.terms.items()})
        if scored.score_b is not None:
            rows["score"] = scored.score_b
        return rows, generating, time.perf_counter() - t0, int(mask.sum(axis=1).max())

    def rollout(self, iteration: int) -> tuple[dict, dict]:
        """The iteration's rows (with dynamic sampling: informative groups first) and what it took."""
        p, s = self.p, self.p.s
        k, n_groups, n = s.samples_per_prompt, s.rollout_batch // s.samples_per_prompt, len(p.prompts.records)
        key = jax.random.fold_in(self.key, iteration)
        kept, dropped = [], []
        info = dict(seconds_generate=0.0, seconds_reward=0.0, decode_steps=0, sampled_rows=0, dropped_groups=0,
                    sampling_rounds=0)
        for round_ in range(s.max_sampling_rounds if s.dynamic_sampling else 1):
            index = (iteration_prompts(n, n_groups, p.config.seed, iteration) if round_ == 0
                     else refill_prompts(n, n_groups, p.config.seed, iteration, round_))
            rows, generating, rewarding, steps = self._sample(index, key if round_ == 0
                                                              else jax.random.fold_in(key, 1_000_003 + round_))
            info["seconds_generate"] += generating
            info["seconds_reward"] += rewarding
            info["decode_steps"] = max(info["decode_steps"], steps)
            info["sampled_rows"] += len(rows["paid"])
            info["sampling_rounds"] = round_ + 1
            if not s.dynamic_sampling:
                return rows, info
            informative = groups.informative_groups(rows["paid"], k)
            info["dropped_groups"] += int((~informative).sum())
            kept.append(groups.take_groups(rows, informative, k))
            dropped.append(groups.take_groups(rows, ~informative, k))
            if sum(len(part["paid"]) for part in kept) >= s.rollout_batch:
                break
        # Too few informative groups after the last round: the batch is filled with dropped ones (zero advantage).
        batch, taken = groups.fill_groups([*kept, *dropped], n_groups, k)
        info["filled_groups"] = max(0, taken - sum(len(part["paid"]) // k for part in kept))
        return batch, info

    # ------------------------------------------------------------------------------------------- update

    def step(self, iteration: int) -> None:
        p, s, mesh, rules = self.p, self.p.s, self.p.mesh, self.p.rules
        rows, info = self.rollout(iteration)
        t0 = time.perf_counter()
        beta = self.kl_control.value
        loss_mask = rows["mask"]
        if s.overlong == "filter":
            loss_mask = groups.overlong_filter(rows["mask"], rows["stopped"])
        device_rows = {key: jnp.asarray(rows[key]) for key in ("prompt_tokens", "prompt_lengths", "tokens", "mask",
                                                                "sampler_logp", "paid", "dense")}
        device_rows["loss_mask"] = jnp.asarray(loss_mask, jnp.float32)
        policy, value = self.states["policy"], self.states.get("value")
        batch, stats = p.score(policy.params, p.reference_params(policy.params),
                               None if value is None else value.params, device_rows, jnp.float32(beta))
        batch = {key: host(v) for key, v in batch.items()}
        stats = {key: float(v) for key, v in jax.device_get(stats).items()}
        seconds_score = time.perf_counter() - t0

        t0 = time.perf_counter()
        sums: dict = {}
        n = s.rollout_batch
        for epoch in range(s.epochs):
            order = np.random.default_rng((p.config.seed, 11, iteration, epoch)).permutation(n)
            for start in range(0, n, s.minibatch):
                chosen = order[start:start + s.minibatch]
                mb = _local_rows({key: v[chosen] for key, v in batch.items()}, mesh, rules)
                ptx = p.ptx_rows(self.ptx_iterator) if self.ptx_iterator is not None else {}
                if not self.logged and not sums:  # the policy update's memory per device, once a process
                    report = memory.step_memory(p.policy_step, policy, {**mb, **ptx}, p.policy_opt, objective="rl")[0]
                    log_line(report.line())
                    if iteration == 1:  # in the run's first row
                        self.memory_metrics = report.metrics()
                policy, metrics = p.policy_step(policy, {**mb, **ptx})
                if value is not None:
                    value, value_metrics = p.value_step(value, mb)
                    metrics = {**metrics, **{name if name.startswith("value") else f"value_{name}": v
                                             for name, v in value_metrics.items()}}
                for name, v in metrics.items():
                    sums.setdefault(name, []).append(v)
        means = {name: float(np.mean(jax.device_get(v))) for name, v in sums.items()}
        for name in ("loss", "value_loss"):
            if not np.isfinite(means.get(name, 0.0)):
                raise TrainingDiverged(f"non-finite RL {name} at iteration {iteration}: {means[name]}; the last "
                                       f"checkpoint, iteration {self.last_saved}, is intact", iteration)
        self.states["policy"] = policy
        if value is not None:
            self.states["value"] = value
        seconds_train = time.perf_counter() - t0
        self.kl_control.update(stats["kl"], s.rollout_batch)
        self.logged = self._metrics(rows, info, stats, means, beta,
                                    dict(generate=info["seconds_generate"], reward=info["seconds_reward"],
                                         score=seconds_score, train=seconds_train))
        self.logged.update(self.memory_metrics)
        self.memory_metrics = {}

    def _metrics(self, rows, info, stats, means, beta, seconds) -> dict:
        p = self.p
        logged = dict(stats, kl_coef=beta, reward=float(rows["reward"].mean()), paid=float(rows["paid"].mean()),
                      stopped=float(rows["stopped"].mean()), policy_grad_norm=means["grad_norm"], lr=means["lr"])
        for name in ("policy_loss", "entropy", "clip_fraction", "clip_fraction_low", "clip_fraction_high",
                     "approx_kl", "ratio", "ptx_loss", "tis_weight", "tis_capped", "value_loss",
                     "value_clip_fraction", "value_grad_norm"):
            if name in means:
                logged[name] = means[name]
        if "kl" in means:
            logged["kl_term"] = means["kl"]  # the loss's estimator of KL(π‖π_ref) on the update's tokens
        if "score" in rows:
            logged["score"] = float(rows["score"].mean())
        for key, value in rows.items():
            if key.startswith("term:") and len(p.s.reward_terms) > 1:
                logged[f"reward_{key[len('term:'):]}"] = float(value.mean())
        if not np.isnan(rows["gold"]).any():
            logged["gold"] = float(rows["gold"].mean())
        if p.s.dynamic_sampling:
            logged.update(dropped_groups=info["dropped_groups"], sampling_rounds=info["sampling_rounds"],
                          filled_groups=info["filled_groups"])
        role_flops = p.role_flops(p.s.rollout_batch, info["decode_steps"], info["sampled_rows"])
        for role, spent in seconds.items():
            logged[f"seconds_{role}"] = spent
            logged[f"mfu_{role}"] = role_flops[role] / max(spent, 1e-9) / self.peak
        return logged

    # ----------------------------------------------------------------------------------- harness hooks

    def metrics(self, iteration: int) -> dict:
        return self.logged

    def evaluate(self, iteration: int) -> dict:
        # Iterations fold in 1..: key 0 gives the same samples at every eval.
        return evaluate(self.p, self.states["policy"].params, jax.random.fold_in(self.key, 0))

    def save(self, iteration: int) -> bool:
        self.checkpoints.save(self.states, iteration, self.ptx_iterator,
                              extra=dict(kl_control=self.kl_control.state_dict()))
        self.last_saved = iteration
        return True

    def finish(self) -> dict:
        evals = [m for m in read_metrics(self.p.workdir) if "eval_reward" in m]
        return dict(before=evals[0], after=evals[-1]) if evals else {}

    def close(self) -> None:
        self.checkpoints.close()


def evaluate(p: RL, params, key) -> dict:
    """Greedy and sampled answers to the eval prompts: reward, gold score, reward-model score, KL (module
    docstring)."""
    s, ep = p.s, p.eval_prompts
    n, width = len(ep.records), s.rollout_batch
    out: dict = {}
    greedy = dataclasses.replace(p.sampling, temperature=0.0, top_k=0, top_p=1.0)
    ref_params = p.reference_params(params)
    for suffix, sampling in (("_greedy", greedy), ("", p.sampling)):
        tokens, masks, kls = [], [], []
        for begin in range(0, n, width):
            index = np.arange(begin, begin + width) % n  # the last block wraps around; extra rows are dropped
            chunk = ep.take(index)
            gen = p.engine.generate(params, chunk.tokens, chunk.lengths, jax.random.fold_in(key, begin), sampling)
            keep = min(width, n - begin)
            if not suffix:
                kls.append(host(p.eval_kl(params, ref_params, jnp.asarray(chunk.tokens), jnp.asarray(chunk.lengths),
                                          gen.tokens, gen.mask))[:keep])
            tokens.append(host(gen.tokens)[:keep])
            masks.append(host(gen.mask)[:keep])
        scored = p.rewards.score(ep, np.concatenate(tokens), np.concatenate(masks))
        out[f"eval_reward{suffix}"] = float(scored.reward_b.mean())
        if scored.gold_b is not None:
            out[f"eval_gold{suffix}"] = float(scored.gold_b.mean())
        if scored.score_b is not None:
            out[f"eval_score{suffix}"] = float(scored.score_b.mean())
        out[f"eval_response_length{suffix}"] = float(np.concatenate(masks).sum(axis=1).mean())
        if not suffix:
            out["eval_kl"] = float(np.concatenate(kls).mean())
    return out


def run(config, workdir: str) -> dict:
    harness = Harness(config, workdir)
    harness.open()
    p = RL(config, workdir, harness.resuming)
    s = p.s
    members = dict(policy=Checkpointer(workdir, config.train.keep_checkpoints, save_data_iterator=s.ptx_coef > 0))
    if p.value_model is not None:
        members["value"] = Checkpointer(os.path.join(workdir, "value"), config.train.keep_checkpoints,
                                        save_data_iterator=False)
    checkpoints = CheckpointSet(members)
    kl_control = losses.make_kl_controller(s.kl_control, s.kl_coef, s.kl_target, s.kl_horizon)
    ptx_iterator = p.ptx_data.train_iterator() if p.ptx_data is not None else None
    resume_from = checkpoints.resume_step() if harness.resuming else None
    if resume_from is not None:
        states = checkpoints.restore(p.abstract_states(), resume_from, ptx_iterator)
        kl_control.load_state_dict(checkpoints.restore_extra(resume_from)["kl_control"])
        harness.resumed(resume_from)
    else:
        states = p.fresh_states()
        harness.started(init_from=config.train.init_from)
        log_line(f"policy from {config.train.init_from}, reference {s.reference_run}, reward {s.reward}"
                 + (f" (reward model {s.reward_run}, readout {p.rewards.readout})" if s.reward_run else "")
                 + (f", value model from {s.reward_run if s.value_from == 'reward' else config.train.init_from}"
                    if p.value_model is not None else ""))
    peak, peak_source = hardware.peak_flops(p.model_cfg.dtype)
    log_line(f"RL ({s.estimator}): {config.train.steps} iterations of {s.rollout_batch} responses "
             f"({s.samples_per_prompt} a prompt), {s.epochs} epochs of minibatches of {s.minibatch}; "
             f"{len(p.prompts.records)} train prompts, {len(p.eval_prompts.records)} eval prompts; "
             f"MFU against {peak_source}")
    iterations = Iterations(p, states, checkpoints, kl_control, ptx_iterator, peak)
    return harness.run(iterations, resume_from or 0)
