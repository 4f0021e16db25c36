"""The training loop every objective shares: build, resume, step, log, evaluate, checkpoint, stop.

    run(config, workdir) -> summary dict

A run directory holds `config.json` (the resolved config), `history.jsonl` (starts, resumes, stops),
`tokenizer.model`, `metrics.jsonl`, `tensorboard/` and `checkpoints/`. Everything the config alone can show wrong
is checked before anything is written. Starting again with the same workdir resumes from the newest intact
checkpoint (verified against its manifest: train/checkpoint.py), data order included, and continues bit for bit;
a resume that would change the run is refused (train/run_record.py). SIGTERM saves a checkpoint and returns; a
non-finite or spiking loss or gradient stops the run before anything bad is written (train/guard.py), leaving
the last good checkpoint intact.

Evaluation covers the data's held-out rows; when the data names eval sets with weights (a data mixture's
components), each set is evaluated on its own and logged as `eval_<name>_<metric>`, and the overall `eval_<metric>`
is their weighted mean.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from llm_jax import sharding
from llm_jax.config_lib import ConfigError
from llm_jax.data import mixture
from llm_jax.data.tokenizer_stage import prepare_tokenizer
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.objectives import get_objective, own_loop
from llm_jax.scaling import flops
from llm_jax.train import hardware
from llm_jax.train import run_record
from llm_jax.train.checkpoint import Checkpointer, restore_params, saved_steps
from llm_jax.train.config_checks import check_config
from llm_jax.train.guard import DivergenceGuard, TrainingDiverged  # noqa: F401 - TrainingDiverged: the loop's error
from llm_jax.train.metrics import MetricsWriter, format_line, log_line, read_metrics
from llm_jax.train.optimizer import make_optimizer, trainable_of, trainable_rule
from llm_jax.train.preemption import StopSignal
from llm_jax.train.state import TrainState, create_state, state_shardings

def validate(config) -> ModelConfig:
    """Every check that needs no data or compilation, so a bad config fails in a second. With model.from_init the
    model section is first taken from train.init_from's run (`run_record.inherit_model`)."""
    run_record.inherit_model(config)
    model_cfg = ModelConfig.from_config(config.model)
    t = config.train
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if t[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
    if t.eval_batches == 0 or t.eval_batches < -1:
        raise ValueError(f"train.eval_batches must be >= 1, or -1 for every held-out row; got {t.eval_batches}")
    if config.optim.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {config.optim.grad_accum}")
    if config.data.seq_len < 2 or config.data.batch_size < 1:
        raise ValueError(f"data.seq_len={config.data.seq_len} and data.batch_size={config.data.batch_size} "
                         "must be at least 2 and 1")
    mixture.components(config.data)  # data.train against data.mixture, and every component's fields
    check_config(config, model_cfg)  # values that cannot be right, and params the mesh cannot split
    return model_cfg


@dataclasses.dataclass
class Training:
    """Everything compiled for one config on one mesh: the pieces the loop, tests and benchmarks share."""
    model: Transformer
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding  # of (B, T) batch arrays; steps take each array's own sharding
    init_params: Callable
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Callable   # jitted (params, batch) -> summed stats
    seed: int

    def create_state(self, params=None) -> TrainState:
        return create_state(self.init_params, self.optimizer, self.state_shardings, self.seed, params=params)


def build_training(config, model_cfg: ModelConfig, mesh, rules) -> Training:
    objective = get_objective(config.objective)
    model = getattr(objective, "model_class", Transformer)(model_cfg, mesh, rules)
    dummy_tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)

    def init_params(key):
        return model.init(key, dummy_tokens, method=Transformer.logits)

    # With LoRA only the adapters (and task heads) train, and `optim.freeze` holds more params still: the
    # optimizer carries that rule, so its state, the state's shardings and the train step cover the rest alone.
    optimizer, schedule = make_optimizer(config.optim, config.train.steps,
                                         trainable=trainable_rule(model_cfg, config.optim))
    abstract_state, state_sh = state_shardings(init_params, optimizer, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(objective.make_train_step(config, model, optimizer, schedule),
                         in_shardings=(state_sh, None), out_shardings=(state_sh, replicated),
                         donate_argnums=0)
    eval_step = jax.jit(objective.make_eval_step(config, model), in_shardings=(state_sh.params, None),
                        out_shardings=replicated)
    return Training(model, optimizer, schedule, abstract_state, state_sh, batch_sh, init_params, train_step,
                    eval_step, config.seed)


def run(config, workdir: str, generative_evals=None) -> dict:
    """Trains (or resumes) the run `config` describes in `workdir`. `generative_evals`: the evaluations of
    `config.train.generative_evals`, built by eval/during_training.py `training_evals(config)`, called with the
    params at every eval."""
    if config.train.get("generative_evals") and generative_evals is None:
        raise ConfigError("train.generative_evals names evaluations but none were passed to train.loop.run: build "
                          "them with llm_jax.eval.during_training.training_evals(config), as `llm-jax train` does")
    loop = own_loop(get_objective(config.objective))
    if loop is not None:  # e.g. PPO: sample, score, update
        if generative_evals:
            raise ConfigError(f"train.generative_evals: the {config.objective} loop runs its own evaluation")
        return loop(config, workdir)
    # Everything that can be checked is checked before anything is written to the workdir.
    model_cfg = validate(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    sharding.check_batch(config.data.batch_size, config.data.seq_len, mesh, rules, config.optim.grad_accum)
    resuming = bool(saved_steps(workdir))
    changes = run_record.resume_changes(config, workdir) if resuming else {}
    if config.train.init_from and not resuming:
        run_record.check_lineage(config, config.train.init_from)
    objective = get_objective(config.objective)
    run_record.make_workdir(workdir)
    tokenizer = prepare_tokenizer(config, workdir, vocab_size=model_cfg.vocab_size, fresh=not resuming)
    data = objective.build_data(config, tokenizer, workdir)

    t = build_training(config, model_cfg, mesh, rules)
    if generative_evals:  # prompts rendered and judges loaded now: bad ones fail before the first step
        if type(t.model) is not Transformer:
            raise ConfigError(f"train.generative_evals: a {config.objective} model does not generate")
        generative_evals.bind(t.model, tokenizer, mesh, rules)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
    train_iter = data.train_iterator()
    if resuming:
        state = checkpointer.restore(t.abstract_state, train_iter)
        run_record.record(config, workdir, "resume", int(state.step),
                          **({"changed": changes, "resume_overrides": config.train.resume_overrides}
                             if changes else {}))
        log_line(f"resumed {workdir} from step {int(state.step)}" + (
            "; changed on purpose: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            if changes else ""))
    elif config.train.init_from:
        params_from_run = getattr(objective, "params_from_run", restore_params)
        # A LoRA model takes the run's weights as its base; its adapters start fresh (B = 0: no change yet).
        params = params_from_run(config.train.init_from, lora.without_adapters(t.abstract_state.params))
        state = t.create_state(params)
        run_record.record(config, workdir, "start", 0, init_from=config.train.init_from)
        log_line(f"started from the params of {config.train.init_from}")
    else:
        state = t.create_state()
        run_record.record(config, workdir, "start", 0)
    train_step, eval_step = t.train_step, t.eval_step
    n_eval = config.train.eval_batches if config.train.eval_batches > 0 else sys.maxsize
    # Named eval sets (a mixture's components) are evaluated each on its own and their means, weighted as the data
    # says, are the overall metrics; without them the overall metrics come from the whole held-out set.
    eval_names = list(data.eval_sets) if data.eval_weights else [""]
    eval_batches = {name: [sharding.global_batch_from_local(b, mesh, rules) for b in data.eval_batches(n_eval, name)]
                    for name in eval_names}

    tokens_per_step = config.data.batch_size * config.data.seq_len * getattr(objective, "sequences_per_row", 1)
    flops_per_step = flops.training_flops_per_token(model_cfg, config.data.seq_len) * tokens_per_step
    peak, peak_source = hardware.peak_flops(model_cfg.dtype)
    start_step, total = int(state.step), config.train.steps
    writer = MetricsWriter(workdir, resume_step=start_step)
    counts = flops.param_counts(model_cfg)
    lora_metrics, lora_line = lora.training_report(t.abstract_state.params, t.optimizer, trainable_of(t.optimizer),
                                                   config.optim.grad_accum)
    if start_step == 0:
        writer.write(0, {"n_params": counts["total"], "n_params_kaplan": counts["kaplan"],
                         "flops_per_token": flops_per_step / tokens_per_step, "peak_flops": peak,
                         **{k: v for k, v in data.stats.items() if isinstance(v, (int, float))}, **lora_metrics})
    if lora_line:
        log_line(lora_line)
    log_line(f"{model_cfg.n_layers} layers, {counts['total']:,} params, mesh "
             f"{dict(mesh.shape)}, {tokens_per_step:,} tokens/step; MFU against {peak_source}")

    def eval_means(step_params, batches) -> dict:
        # One batch at a time, each waited on: independent eval programs in flight together may run their
        # collectives in a different order on each host (a deadlock seen with 2 CPU processes over gloo).
        sums: dict = {}
        for batch in batches:
            for key, value in jax.device_get(eval_step(step_params, batch)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        weight = max(float(sums.pop("weight")), 1.0)
        return {f"eval_{k}": float(v) / weight for k, v in sums.items()}

    def evaluate(step_params) -> dict:
        generated = generative_evals(step_params) if generative_evals else {}
        means = {name: eval_means(step_params, batches) for name, batches in eval_batches.items()}
        if "" in means:
            return {**objective.finish_eval(means[""]), **generated}
        overall = {k: sum(w * means[name][k] for name, w in data.eval_weights.items()) for k in means[eval_names[0]]}
        result = objective.finish_eval(overall)
        for name, named in means.items():  # eval_loss of set "domain" is logged as eval_domain_loss
            result.update({f"eval_{name}_{k[len('eval_'):]}": v for k, v in objective.finish_eval(named).items()})
        return {**result, **generated}

    pending: list[tuple[int, dict]] = []  # device metrics not yet checked, so steps never wait on the host
    interval = dict(start=time.perf_counter(), steps=0, paused=0.0)
    summary = dict(workdir=workdir, start_step=start_step)
    show_bar = config.train.progress_bar and sys.stderr.isatty() and jax.process_index() == 0
    bar = tqdm(total=total, initial=start_step, disable=not show_bar, dynamic_ncols=True)
    last_saved = checkpointer.latest_step()

    guard = DivergenceGuard(config.train)

    def drain() -> dict:
        """Fetches pending metrics through the divergence guard (which stops a run that is not finite or
        spikes), returns the last step's metrics."""
        fetched = jax.device_get(pending)
        pending.clear()
        for at, metrics in fetched:
            guard.check(at, float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["lr"]), last_saved,
                        checkpointer.directory)
        return {k: float(v) for k, v in fetched[-1][1].items()} if fetched else {}

    def save(step_state) -> bool:
        """Saves unless a spike is in progress (the state is suspect); True when saved."""
        nonlocal last_saved
        drain()
        if guard.spiking:
            log_line(f"step {int(step_state.step)}: no checkpoint while a loss spike is open (since step "
                     f"{guard.open_since})")
            return False
        checkpointer.save(step_state, train_iter)
        last_saved = int(step_state.step)
        return True

    with StopSignal() as stop:
        try:
            step = start_step
            while step < total:
                batch = sharding.global_batch_from_local(next(train_iter), mesh, rules)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics))
                if step == start_step + 1:  # leave compilation out of the throughput figures
                    jax.block_until_ready(metrics)
                    interval.update(start=time.perf_counter(), steps=0, paused=0.0)
                else:
                    interval["steps"] += 1
                bar.update(1)
                if step % config.train.log_every == 0 or step == total:
                    logged = drain()
                    elapsed = time.perf_counter() - interval["start"] - interval["paused"]
                    if interval["steps"]:
                        logged["tokens_per_s"] = interval["steps"] * tokens_per_step / elapsed
                        logged["mfu"] = interval["steps"] * flops_per_step / elapsed / peak
                    logged["tokens"] = step * tokens_per_step
                    writer.write(step, logged)
                    _show(bar, step, total, logged)
                    interval.update(start=time.perf_counter(), steps=0, paused=0.0)
                is_eval = step % config.train.eval_every == 0 or step == total
                is_save = step % config.train.checkpoint_every == 0 or step == total
                if is_eval or is_save:
                    jax.block_until_ready(state)  # training time ends here; eval and saving are not throughput
                    paused_from = time.perf_counter()
                    if is_eval:
                        evaluated = evaluate(state.params)
                        writer.write(step, {**evaluated, "tokens": step * tokens_per_step})
                        summary.update(evaluated)
                        _show(bar, step, total, evaluated, always=True)
                    if is_save:
                        save(state)
                    interval["paused"] += time.perf_counter() - paused_from
                if stop.agreed():
                    saved = save(state)
                    checkpointer.wait()
                    log_line(f"SIGTERM: saved step {step} to {checkpointer.directory}; rerun the same command "
                             "to resume" if saved else f"SIGTERM at step {step}, during a loss spike: the newest "
                             f"checkpoint is step {last_saved}")
                    run_record.append_history(workdir, "preempted", step, saved=saved)
                    summary.update(stopped_early=True)
                    break
            drain()
        except TrainingDiverged as e:
            run_record.append_history(workdir, "diverged", e.step, reason=str(e), last_saved=last_saved)
            raise
        finally:
            bar.close()
            writer.close()
            checkpointer.close()
    logged = read_metrics(workdir)
    summary.update(step=int(state.step), final_loss=_last(logged, "loss"))
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):  # a finished run, rerun, reports its last eval
        if key not in summary and _last(logged, key) is not None:
            summary[key] = _last(logged, key)
    return summary


def _last(metrics: list[dict], key: str):
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def _show(bar, step: int, total: int, metrics: dict, always: bool = False) -> None:
    line = format_line(step, total, metrics)
    if bar.disable:
        log_line(line)
    else:
        bar.set_postfix_str(line.split("  ", 1)[-1] if "  " in line else "")
        if always:
            bar.write(line, file=sys.stderr)
