"""PPO's loop: sample, score, update; evaluate, checkpoint and resume like every other run.

    run(config, workdir) -> summary       (`llm-jax train` with objective "ppo"; see objectives/ppo.py)

Iteration i (1-based; `train.steps` of them) takes the i-th block of `ppo.rollout_batch / samples_per_prompt`
prompts from a per-epoch permutation of the prompt file, samples `ppo.samples_per_prompt` responses to each
(key fold_in(seed, i)), scores the rollout in one jitted program (policy and reference log-probs, values,
reward-model scores, per-token rewards, GAE), then runs `ppo.epochs` shuffled passes of minibatch updates of
the policy and of the value model. Everything is a pure function of (seed, i) and the checkpointed states,
so a resumed run continues bit for bit.

Checkpoints are labelled by iteration: the policy's under `<workdir>/checkpoints/` (so `llm-jax generate
--run <workdir>` and a later stage's `train.init_from` read the policy), the value model's under
`<workdir>/value/checkpoints/`, and the KL coefficient (and with PPO-ptx the pretraining stream's position)
beside the policy's.

What pays (`ppo.reward`): "reward_model", the reward run's model read on the sampled tokens inside the jitted
rollout program, or any judge of eval/judges.py by its spec (`gold`, exact_match, regex_match, numeric_match,
a user's module:function), called as `judge.score(prompt records, response texts)` on every rollout; with
`ppo.reward_shaping="dense"` a judge's score is split over the tokens by its increments over the response's
prefixes (`judge_steps`).

Metrics each iteration: `score` (reward model, raw) and `score_norm` (what the policy is paid), `gold` (the
embedded task's gold judge on the samples, when the prompts carry a task), `kl` (Σ_t k1 per response:
log π_old − log π_ref, an unbiased estimate of KL(π‖π_ref) on samples of π), `kl_coef` (β), `entropy`,
`clip_fraction`, `approx_kl`, `policy_loss`, `ptx_loss` (PPO-ptx's pretraining loss), `value_loss`,
`value_clip_fraction`, `explained_variance` (of the returns by the values before the update),
`response_length`, `stopped` (fraction ending with the end marker), and per role (generate, score, train)
the seconds and the MFU. Evaluation, at iteration 0 and every `train.eval_every`: on `ppo.n_eval_prompts`
held-out prompts, greedy answers (`eval_gold_greedy`, `eval_score_greedy`) and one sampled answer each
(`eval_gold`, `eval_score`, `eval_kl`).
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import runs, sharding
from llm_jax.data import chat
from llm_jax.data.mixture import build_lm_data
from llm_jax.data.post_training import resolve_spec
from llm_jax.data.tokenizer_files import load_tokenizer, run_tokenizer_path
from llm_jax.data.tokenizer_stage import TokenizerMismatch, prepare_tokenizer
from llm_jax.generate import SamplingConfig, generate
from llm_jax.eval.judges import GoldJudge, JudgeError, applies, load_judge
from llm_jax.generation_io import batch_shards, decode_response, padded_length, padding_id, read_prompts
from llm_jax.model import lora
from llm_jax.model.transformer import Transformer
from llm_jax.objectives import ppo, reward
from llm_jax.rl import losses, rollout
from llm_jax.scaling import flops
from llm_jax.train import hardware
from llm_jax.train import step as train_step
from llm_jax.train.checkpoint import Checkpointer, CheckpointError, restore_params, saved_steps
from llm_jax.train import run_record
from llm_jax.train.loop import validate
from llm_jax.train.preemption import StopSignal
from llm_jax.train.metrics import MetricsWriter, format_line, log_line, read_metrics
from llm_jax.train.optimizer import make_optimizer, trainable_rule
from llm_jax.train.state import create_state, state_shardings


def _host(x) -> np.ndarray:
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


@dataclasses.dataclass
class Prompts:
    """Rendered prompts as fixed-shape arrays: tokens (n, P) right-padded, lengths (n,), and the prompt records
    the judges read (eval/judges.py prompt_record)."""
    tokens: np.ndarray
    lengths: np.ndarray
    records: list[dict]

    @classmethod
    def read(cls, spec: str, split: str, tokenizer, template: str, max_len: int, limit=None):
        rendered = read_prompts(resolve_spec(spec, "prompts", split), tokenizer, template=template,
                                max_len=max_len, judge=GoldJudge())[:limit]
        tokens = np.full((len(rendered), padded_length(max(len(p.tokens) for p in rendered))),
                         padding_id(tokenizer), np.int32)
        for i, p in enumerate(rendered):
            tokens[i, :len(p.tokens)] = p.tokens
        return cls(tokens, np.array([len(p.tokens) for p in rendered], np.int32), [p.record for p in rendered])

    def padded(self, width: int, pad_id: int) -> "Prompts":
        return dataclasses.replace(self, tokens=np.pad(self.tokens, ((0, 0), (0, width - self.tokens.shape[1])),
                                                       constant_values=pad_id))

    def take(self, index: np.ndarray) -> "Prompts":
        return Prompts(self.tokens[index], self.lengths[index], [self.records[i] for i in index])


def iteration_prompts(n: int, batch: int, seed: int, iteration: int) -> np.ndarray:
    """Indices of iteration i's prompts: the i-th block of `batch` in an endless sequence of permutations of
    range(n), one per pass (each a pure function of (seed, pass)); a block may span two passes."""
    start = (iteration - 1) * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng((seed, 7, epoch)).permutation(n)
        out.extend(perm[offset:offset + batch - len(out)].tolist())
    return np.asarray(out, np.int64)


def _response_texts(tokenizer, tokens_bn, mask_bn, stop_ids) -> list[str]:
    return [decode_response(tokenizer, [int(t) for t in row[:int(m.sum())]], stop_ids)[0]
            for row, m in zip(tokens_bn, mask_bn)]


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


def _reward_statistics(reward_run: str) -> tuple[float, float]:
    """(mean, std) of the reward model's scores at its last eval: how PPO standardises the scores."""
    evals = [m for m in read_metrics(reward_run) if "eval_reward_mean" in m and "eval_reward_std" in m]
    if not evals:
        raise CheckpointError(f"reward run {reward_run!r} logged no eval_reward_mean/eval_reward_std (metrics.jsonl)"
                              "; set ppo.normalize_score=False to use its raw scores")
    return float(evals[-1]["eval_reward_mean"]), max(float(evals[-1]["eval_reward_std"]), 1e-6)


def reward_judge(spec: str):
    """The judge `ppo.reward` names (eval/judges.py load_judge); ValueError naming the option."""
    try:
        return load_judge(spec)
    except JudgeError as e:
        raise ValueError(f"ppo.reward={spec!r}: {e}") from None


class PPO:
    """The models, their states and the jitted programs of one PPO run."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.s = s = ppo.settings(config)
        self.model_cfg = validate(config)
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.check_rules(config.mesh_rules)
        shards = batch_shards(self.mesh, self.rules)
        if s.minibatch % shards or s.rollout_batch % shards or (s.ptx_coef > 0 and s.ptx_batch % shards):
            raise sharding.ShardingError(f"ppo.minibatch={s.minibatch}, ppo.rollout_batch={s.rollout_batch} and "
                                         f"(with ptx) ppo.ptx_batch={s.ptx_batch} must divide over the mesh's "
                                         f"{shards} batch shards")
        self.tokenizer = prepare_tokenizer(config, workdir, vocab_size=self.model_cfg.vocab_size,
                                           fresh=not saved_steps(workdir))
        for name, run_dir in (("ppo.reward_run", s.reward_run), ("ppo.reference_run", s.reference_run)):
            theirs = load_tokenizer(run_tokenizer_path(run_dir))
            if theirs.sha256 != self.tokenizer.sha256:
                raise TokenizerMismatch(f"{name}={run_dir!r} has another tokenizer than the policy "
                                        f"({config.train.init_from!r})")
        self.template = config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
        self.stop_ids = tuple(chat.stop_ids(self.tokenizer, self.template))
        self.judge = None if s.reward == ppo.REWARD_MODEL else reward_judge(s.reward)
        self.sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                       top_p=s.top_p, stop_ids=self.stop_ids)
        max_prompt = int(config.data.seq_len) - s.max_new_tokens
        train = Prompts.read(s.prompts, "train", self.tokenizer, self.template, max_prompt)
        evals = Prompts.read(s.eval_prompts, "eval", self.tokenizer, self.template, max_prompt, s.n_eval_prompts)
        width = max(train.tokens.shape[1], evals.tokens.shape[1])  # one compiled shape for training and evals
        self.prompts, self.eval_prompts = (p.padded(width, padding_id(self.tokenizer)) for p in (train, evals))
        self.seq_len = width + s.max_new_tokens
        self.ptx_data = self._ptx_data() if s.ptx_coef > 0 else None
        self._build_models()
        self._build_programs()

    def _ptx_data(self):
        """PPO-ptx's pretraining rows: `ppo.ptx_data` packed at data.seq_len, ptx_batch rows per update, as a
        checkpointed grain stream (saved with the policy, so a resumed run reads the same rows)."""
        data = self.config.data.copy_and_resolve_references()
        data.update(train=self.s.ptx_data, eval="", batch_size=self.s.ptx_batch)
        return build_lm_data(data, self.tokenizer, cache_dir=data.cache_dir or os.path.join(self.workdir, "data"),
                             seed=self.config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())

    def ptx_rows(self, iterator) -> dict[str, jax.Array]:
        """The next pretraining rows, `ptx_`-prefixed and sharded over the batch axes."""
        local = next(iterator)
        rows = sharding.global_batch_from_local(local, self.mesh, self.rules)
        return {ppo.PTX_PREFIX + k: v for k, v in rows.items()}

    # ------------------------------------------------------------------------------------------ models

    def _build_models(self):
        s, cfg, mesh, rules, config = self.s, self.model_cfg, self.mesh, self.rules, self.config
        self.policy = Transformer(cfg, mesh, rules)
        self.value_model = reward.RewardModel(cfg, mesh, rules)
        total = config.train.steps * s.updates_per_iteration
        trainable = trainable_rule(cfg, config.optim)
        self.policy_opt, self.policy_schedule = make_optimizer(config.optim, total, trainable)
        value_optim = config.optim.copy_and_resolve_references()
        if s.value_lr > 0:
            value_optim.lr = s.value_lr
        self.value_opt, self.value_schedule = make_optimizer(value_optim, total, trainable)
        dummy = jnp.zeros((1, self.seq_len), jnp.int32)
        self.init_policy = lambda key: self.policy.init(key, dummy, method=Transformer.logits)
        self.init_value = lambda key: self.value_model.init(key, dummy, method=Transformer.logits)
        self.policy_abstract, self.policy_sh = state_shardings(self.init_policy, self.policy_opt, mesh, rules)
        self.value_abstract, self.value_sh = state_shardings(self.init_value, self.value_opt, mesh, rules)
        # The reference: a LoRA policy's own base weights (adapters left out: one shared copy), else a run.
        self.ref_model = Transformer(lora.without_lora(cfg), mesh, rules)
        self.ref_params = None
        if not cfg.lora_rank:
            run_record.check_lineage(config, s.reference_run)
            self.ref_params = restore_params(s.reference_run, lora.without_adapters(self.policy_abstract.params))
        objective = run_record.read_run_config(s.reward_run).objective
        if objective != "reward":
            raise CheckpointError(f"ppo.reward_run={s.reward_run!r} is a {objective!r} run, not a reward model")
        rm = runs.load_run(s.reward_run, mesh=mesh, rules=rules, model_cls=reward.RewardModel)
        self.rm_model, self.rm_params, self.rm_readout = rm.model, rm.params, reward.readout_of(rm.config)
        self.rm_cfg = rm.model_cfg
        if s.reward_shaping == "dense" and s.reward == "reward_model" and self.rm_readout != "likelihood":
            raise ValueError(f'ppo.reward_shaping="dense" pays each token its part of the score, which a reward '
                             f'model with readout {self.rm_readout!r} ({s.reward_run}) does not have: use a '
                             f'"likelihood" reward model, ppo.reward="gold", or ppo.reward_shaping="final"')
        self.score_mean, self.score_std = _reward_statistics(s.reward_run) if s.normalize_score else (0.0, 1.0)

    def fresh_states(self):
        s, config = self.s, self.config
        run_record.check_lineage(config, config.train.init_from)
        params = restore_params(config.train.init_from, lora.without_adapters(self.policy_abstract.params))
        policy = create_state(self.init_policy, self.policy_opt, self.policy_sh, config.seed, params)
        value_run = s.reward_run if s.value_from == "reward" else config.train.init_from
        run_record.check_lineage(config, value_run)
        value_params = reward.params_from_run(value_run, lora.without_adapters(self.value_abstract.params))
        value = create_state(self.init_value, self.value_opt, self.value_sh, config.seed + 1, value_params)
        return policy, value

    def reference_params(self, policy_params):
        return lora.without_adapters(policy_params) if self.ref_params is None else self.ref_params

    # ---------------------------------------------------------------------------------------- programs

    def _build_programs(self):
        s, mesh = self.s, self.mesh
        replicated = sharding.replicated(mesh)
        policy_step = train_step.make_train_step(ppo.make_policy_loss_fn(self.policy, s), self.policy_opt,
                                                 self.policy_schedule)
        value_step = train_step.make_train_step(ppo.make_value_loss_fn(self.value_model, s), self.value_opt,
                                                self.value_schedule)
        self.policy_step = jax.jit(policy_step, in_shardings=(self.policy_sh, None),
                                   out_shardings=(self.policy_sh, replicated), donate_argnums=0)
        self.value_step = jax.jit(value_step, in_shardings=(self.value_sh, None),
                                  out_shardings=(self.value_sh, replicated), donate_argnums=0)
        self.score = jax.jit(self._score_rollout)
        self.eval_kl = jax.jit(self._eval_kl)

    def _sequences(self, prompt_tokens, prompt_lengths, gen):
        return rollout.assemble(prompt_tokens, prompt_lengths, gen.tokens, gen.mask)

    def _stopped(self, seqs):
        n_b = jnp.sum(seqs.mask_bn, axis=1).astype(jnp.int32)
        last_b = jnp.take_along_axis(seqs.response_bn, jnp.maximum(n_b - 1, 0)[:, None], axis=1)[:, 0]
        return (n_b > 0) & jnp.isin(last_b, jnp.asarray(self.stop_ids))

    def _score_rollout(self, policy_params, ref_params, value_params, rm_params, prompt_tokens, prompt_lengths,
                       gen, beta, judged_b, judged_steps_bn):
        """Everything one iteration's updates need, in one program (objectives/ppo.py's equations).
        `judged_b`: a judge's scores when one pays (ppo.reward); `judged_steps_bn`: their increments over the
        response's prefixes (dense shaping)."""
        s = self.s
        seqs = self._sequences(prompt_tokens, prompt_lengths, gen)
        old_logp = rollout.response_log_probs(self.policy, policy_params, seqs)
        ref_logp = rollout.response_log_probs(self.ref_model, ref_params, seqs)
        if s.baseline == "value":
            old_values = rollout.values(self.value_model, value_params, seqs)
        else:  # the group baseline replaces the value model: V = 0, and no forward pass for it
            old_values = jnp.zeros_like(old_logp)
        head_b, terms_bn = rollout.reward_terms(self.rm_model, rm_params, seqs, self.rm_readout)
        score_b = head_b + jnp.sum(terms_bn, axis=1)
        stopped_b = self._stopped(seqs)
        penalty_b = s.unfinished_penalty * (1.0 - stopped_b)
        if self.judge is not None:  # a judge pays (gold: the ceiling a perfect reward model would give)
            paid_b, steps_bn = judged_b - penalty_b, judged_steps_bn * seqs.mask_bn
        else:
            paid_b, steps_bn = (score_b - self.score_mean) / self.score_std - penalty_b, terms_bn / self.score_std
        # Dense shaping pays each token its part as it is emitted and the rest at the end: the same total.
        dense_bn = steps_bn if s.reward_shaping == "dense" else None
        final_b = paid_b - jnp.sum(steps_bn, axis=1) if dense_bn is not None else paid_b
        kl_bn = losses.kl_estimate(old_logp, ref_logp, s.kl_estimator) * seqs.mask_bn
        if s.baseline == "group":  # the other samples of the same prompt are the baseline; no value model
            final_b = final_b - losses.leave_one_out_mean(paid_b, s.samples_per_prompt)
        rewards_bn = losses.token_rewards(final_b, kl_bn, seqs.mask_bn, beta, dense_bn)
        advantages_bn, returns_bn = losses.gae(rewards_bn, old_values, seqs.mask_bn, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages_bn = losses.whiten(advantages_bn, seqs.mask_bn)
        k1_b = jnp.sum((old_logp - ref_logp) * seqs.mask_bn, axis=1)
        batch = dict(tokens=seqs.tokens_bl, segment_ids=seqs.segment_ids_bl, index=seqs.index_bn,
                     response=seqs.response_bn, mask=seqs.mask_bn, old_logp=old_logp, old_values=old_values,
                     advantages=advantages_bn, returns=returns_bn)
        stats = dict(score=jnp.mean(score_b), score_norm=jnp.mean(paid_b), kl=jnp.mean(k1_b),
                     stopped=jnp.mean(stopped_b.astype(jnp.float32)),
                     response_length=jnp.mean(jnp.sum(seqs.mask_bn, axis=1)),
                     explained_variance=losses.explained_variance(old_values, returns_bn, seqs.mask_bn))
        return batch, stats

    def _eval_kl(self, policy_params, ref_params, rm_params, prompt_tokens, prompt_lengths, gen):
        seqs = self._sequences(prompt_tokens, prompt_lengths, gen)
        k1_b = jnp.sum(rollout.response_log_probs(self.policy, policy_params, seqs)
                       - rollout.response_log_probs(self.ref_model, ref_params, seqs), axis=1)
        return k1_b, rollout.reward_scores(self.rm_model, rm_params, seqs, self.rm_readout)

    # ------------------------------------------------------------------------------------------- flops

    def role_flops(self, n_rows: int, decode_steps: int) -> dict[str, float]:
        """FLOPs of one iteration per role, by the 6N (+ attention) count of `scaling.flops` over the tokens
        each role processes. Generation prefills the prompts and decodes `decode_steps` tokens a row. Scoring
        is a forward of the policy, the reference and the value model over whole sequences, with the LM head
        read at the N response positions only (and not at all for the value model), plus the reward model's
        full forward. Training is forward + backward (3×) of the policy and the value model, `ppo.epochs`
        times, plus with PPO-ptx forward + backward of the policy over `ppo.ptx_batch` pretraining rows per update.
        With the group baseline the value model runs in neither."""
        cfg, length, n_new = self.model_cfg, self.seq_len, self.s.max_new_tokens
        fwd = flops.forward_flops_per_token(cfg, length)
        head = 2 * cfg.d_model * cfg.vocab_size  # per position where the LM head runs
        trunk = n_rows * length * (fwd - head)
        policy_fwd = trunk + n_rows * n_new * head
        value_fwd = trunk if self.s.baseline == "value" else 0  # the group baseline runs no value model
        prompt_width = self.prompts.tokens.shape[1]
        ptx_len = int(self.config.data.seq_len)
        ptx = 0 if self.ptx_data is None else (self.s.updates_per_iteration * self.s.ptx_batch * ptx_len
                                               * flops.forward_flops_per_token(cfg, ptx_len))
        return dict(generate=n_rows * (prompt_width + decode_steps) * fwd,
                    score=2 * policy_fwd + value_fwd + n_rows * length * flops.forward_flops_per_token(self.rm_cfg,
                                                                                                       length),
                    train=self.s.epochs * 3 * (policy_fwd + value_fwd) + 3 * ptx)


def run(config, workdir: str) -> dict:
    resuming = bool(saved_steps(workdir))
    changes = run_record.resume_changes(config, workdir) if resuming else {}
    run_record.make_workdir(workdir)
    p = PPO(config, workdir)
    s = p.s
    policy_ckpt = Checkpointer(workdir, config.train.keep_checkpoints, save_data_iterator=config.ppo.ptx_coef > 0)
    value_ckpt = Checkpointer(os.path.join(workdir, "value"), config.train.keep_checkpoints, save_data_iterator=False)
    # The newest iteration whose policy and value checkpoints are both intact (damaged ones are set aside).
    value_intact = set(value_ckpt.intact_steps())
    resume_from = next((step for step in policy_ckpt.intact_steps() if step in value_intact), None)
    if resuming and resume_from is None:
        raise CheckpointError(f"no iteration of {workdir} has an intact policy and value checkpoint: start the run "
                              "again in a new --workdir")
    for checkpointer in (policy_ckpt, value_ckpt):  # a step whose partner is damaged is saved again, whole
        for step in checkpointer.manager.all_steps():
            if resume_from is not None and step > resume_from:
                checkpointer.set_aside(step, "the other model's checkpoint of this iteration is damaged")
    kl_control = losses.make_kl_controller(s.kl_control, s.kl_coef, s.kl_target, s.kl_horizon)
    ptx_iterator = p.ptx_data.train_iterator() if p.ptx_data is not None else None
    if resume_from is not None:
        policy = policy_ckpt.restore(p.policy_abstract, ptx_iterator, step=resume_from)
        try:
            value = value_ckpt.restore(p.value_abstract, step=resume_from)
        except FileNotFoundError as e:
            raise CheckpointError(f"{workdir} has policy checkpoint {resume_from} but no value checkpoint of it") from e
        kl_control.load_state_dict(policy_ckpt.restore_extra(resume_from)["kl_control"])
        run_record.record(config, workdir, "resume", resume_from, **({"changed": changes} if changes else {}))
        log_line(f"resumed {workdir} from iteration {resume_from}")
    else:
        policy, value = p.fresh_states()
        run_record.record(config, workdir, "start", 0, init_from=config.train.init_from)
        log_line(f"policy from {config.train.init_from}, value model from "
                 f"{s.reward_run if s.value_from == 'reward' else config.train.init_from}, reward model "
                 f"{s.reward_run} (readout {p.rm_readout}), reference {s.reference_run}")
    start = resume_from or 0
    writer = MetricsWriter(workdir, resume_step=start)
    peak, peak_source = hardware.peak_flops(p.model_cfg.dtype)
    log_line(f"PPO: {config.train.steps} iterations of {s.rollout_batch} responses ({s.samples_per_prompt} a prompt, "
             f"baseline {s.baseline}), {s.epochs} epochs of minibatches "
             f"of {s.minibatch}; {len(p.prompts.records)} train prompts, {len(p.eval_prompts.records)} eval prompts; "
             f"MFU against {peak_source}")
    key = jax.random.key(config.seed)
    summary = dict(workdir=workdir, start_step=start)

    def evaluate(iteration: int) -> dict:
        out = _evaluate(p, policy.params, jax.random.fold_in(key, 0))  # iterations fold in 1..: same samples each eval
        writer.write(iteration, out)
        log_line(format_line(iteration, config.train.steps, out))
        return out

    def save(iteration: int):
        value_ckpt.save(value, label=iteration)
        value_ckpt.wait()  # the value model first: a policy checkpoint always has its value model
        policy_ckpt.save(policy, ptx_iterator, label=iteration, extra=dict(kl_control=kl_control.state_dict()))

    with StopSignal() as stop:
        try:
            if start == 0:
                evaluate(0)
            for iteration in range(start + 1, config.train.steps + 1):
                policy, value, logged = _iteration(p, policy, value, kl_control, key, iteration, peak, ptx_iterator)
                if iteration % config.train.log_every == 0 or iteration == config.train.steps:
                    writer.write(iteration, logged)
                    log_line(format_line(iteration, config.train.steps, logged))
                if iteration % config.train.eval_every == 0 or iteration == config.train.steps:
                    evaluate(iteration)
                if iteration % config.train.checkpoint_every == 0 or iteration == config.train.steps:
                    save(iteration)
                if stop.agreed():
                    save(iteration)
                    log_line(f"SIGTERM: saved iteration {iteration} to {policy_ckpt.directory}; rerun the same "
                             "command to resume")
                    summary.update(stopped_early=True, step=iteration)
                    break
        finally:
            writer.close()
            value_ckpt.close()
            policy_ckpt.close()
    summary.setdefault("step", config.train.steps)
    logged = read_metrics(workdir)
    evals = [m for m in logged if "eval_gold_greedy" in m or "eval_score" in m]
    if evals:
        summary.update(before=evals[0], after=evals[-1])
    return summary


def _iteration(p: PPO, policy, value, kl_control, key, iteration: int, peak: float, ptx_iterator=None):
    s, mesh, rules = p.s, p.mesh, p.rules
    times = {}
    t0 = time.perf_counter()
    k = s.samples_per_prompt  # each prompt k times in a row: a group
    prompts = p.prompts.take(np.repeat(iteration_prompts(len(p.prompts.records), s.rollout_batch // k, p.config.seed,
                                                         iteration), k))
    gen = generate(p.policy, policy.params, prompts.tokens, prompts.lengths, jax.random.fold_in(key, iteration),
                   p.sampling)
    jax.block_until_ready(gen)
    times["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    beta = kl_control.value
    tokens_bn, mask_bn = _host(gen.tokens), _host(gen.mask)
    texts = _response_texts(p.tokenizer, tokens_bn, mask_bn, p.stop_ids)
    gold_scores = judged(GoldJudge(), prompts, texts)
    judged_b, steps_bn = np.zeros(len(texts), np.float32), np.zeros(tokens_bn.shape, np.float32)
    if p.judge is not None:
        scores = gold_scores if p.judge.name == GoldJudge.name else judged(p.judge, prompts, texts)
        if scores is None:
            raise ValueError(f"ppo.reward={s.reward!r} cannot judge every prompt of ppo.prompts={s.prompts!r} "
                             '(the gold judge needs default-task prompts with a "task" key)')
        judged_b = scores.astype(np.float32)
        if s.reward_shaping == "dense":
            steps_bn = judge_steps(p.judge, prompts, p.tokenizer, tokens_bn, mask_bn, p.stop_ids)
    batch, stats = p.score(policy.params, p.reference_params(policy.params), value.params, p.rm_params,
                           prompts.tokens, prompts.lengths, gen, jnp.float32(beta), judged_b, steps_bn)
    batch = {k: _host(v) for k, v in batch.items()}
    stats = {k: float(v) for k, v in jax.device_get(stats).items()}
    times["score"] = time.perf_counter() - t0
    gold = None if gold_scores is None else float(gold_scores.mean())

    t0 = time.perf_counter()
    sums: dict = {}
    n = s.rollout_batch
    for epoch in range(s.epochs):
        order = np.random.default_rng((p.config.seed, 11, iteration, epoch)).permutation(n)
        for start in range(0, n, s.minibatch):
            rows = order[start:start + s.minibatch]
            mb = _local_rows({k: v[rows] for k, v in batch.items()}, mesh, rules)
            ptx = p.ptx_rows(ptx_iterator) if ptx_iterator is not None else {}
            policy, policy_metrics = p.policy_step(policy, {**mb, **ptx})
            if s.baseline == "value":
                value, value_metrics = p.value_step(value, mb)
                policy_metrics = {**policy_metrics, **{name if name.startswith("value") else f"value_{name}": v
                                                       for name, v in value_metrics.items()}}
            for name, v in policy_metrics.items():
                sums.setdefault(name, []).append(v)
    means = {name: float(np.mean(jax.device_get(v))) for name, v in sums.items()}
    if not all(np.isfinite(means.get(name, 0.0)) for name in ("loss", "value_loss")):
        raise FloatingPointError(f"non-finite PPO loss at iteration {iteration}: policy {means['loss']}, value "
                                 f"{means.get('value_loss')}; the last checkpoint is intact")
    times["train"] = time.perf_counter() - t0
    kl_control.update(stats["kl"], s.rollout_batch)

    decode_steps = int(batch["mask"].sum(axis=1).max())
    role_flops = p.role_flops(n, decode_steps)
    logged = dict(stats, kl_coef=beta, entropy=means["entropy"], clip_fraction=means["clip_fraction"],
                  approx_kl=means["approx_kl"], policy_loss=means["policy_loss"], policy_grad_norm=means["grad_norm"],
                  lr=means["lr"])
    if "ptx_loss" in means:
        logged["ptx_loss"] = means["ptx_loss"]
    if s.baseline == "value":
        logged.update(value_loss=means["value_loss"], value_clip_fraction=means["value_clip_fraction"],
                      value_grad_norm=means["value_grad_norm"])
    if gold is not None:
        logged["gold"] = gold
    for role, seconds in times.items():
        logged[f"seconds_{role}"] = seconds
        logged[f"mfu_{role}"] = role_flops[role] / seconds / peak
    return policy, value, logged


def _evaluate(p: PPO, params, key) -> dict:
    """Greedy and sampled answers to the eval prompts: gold score, reward-model score, KL (module docstring)."""
    s, ep = p.s, p.eval_prompts
    n, rows = len(ep.records), s.rollout_batch
    out: dict = {}
    greedy = dataclasses.replace(p.sampling, temperature=0.0, top_k=0, top_p=1.0)
    ref_params = p.reference_params(params)
    for name, sampling in (("_greedy", greedy), ("", p.sampling)):
        answers, scores, kls, lengths = [], [], [], []
        for begin in range(0, n, rows):
            index = np.arange(begin, begin + rows) % n  # the last block wraps around; extra rows are dropped
            chunk = ep.take(index)
            gen = generate(p.policy, params, chunk.tokens, chunk.lengths, jax.random.fold_in(key, begin), sampling)
            k1_b, score_b = p.eval_kl(params, ref_params, p.rm_params, chunk.tokens, chunk.lengths, gen)
            keep = min(rows, n - begin)
            tokens, mask = _host(gen.tokens)[:keep], _host(gen.mask)[:keep]
            answers += _response_texts(p.tokenizer, tokens, mask, p.stop_ids)
            scores.append(_host(score_b)[:keep])
            kls.append(_host(k1_b)[:keep])
            lengths.append(mask.sum(axis=1))
        gold = judged(GoldJudge(), ep, answers)
        if gold is not None:
            out[f"eval_gold{name}"] = float(gold.mean())
        out[f"eval_score{name}"] = float(np.mean(np.concatenate(scores)))
        out[f"eval_response_length{name}"] = float(np.mean(np.concatenate(lengths)))
        if not name:
            out["eval_kl"] = float(np.mean(np.concatenate(kls)))
    return out
