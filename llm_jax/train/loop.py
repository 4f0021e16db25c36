"""The loop of every objective that is a pass over a fixed dataset (lm, sft, reward, dpo), on the run harness.

    run(config, workdir, objective) -> summary dict      (llm_jax/training.py picks the objective and the loop)

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

The lifecycle (resume, history, metrics, cadence, SIGTERM) is train/harness.py's, shared with the RL loop; this
module supplies the steps: build, then `_Steps` (train step, async metrics through the divergence guard,
throughput, evaluation, checkpoints).

The train step is compiled ahead of the first batch, on abstract shapes, and its per-device memory is logged and
written to the step-0 metrics (`memory_*_bytes`, train/memory.py); the steps then call that compiled executable,
so the step compiles once per run. `memory_before_launch(config, objective)` is the same measurement without a
run: `llm-jax memory`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.config_lib import ConfigError
from llm_jax.data import mixture
from llm_jax.data.tokenizer_stage import prepare_tokenizer
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.scaling import flops
from llm_jax.train import hardware, memory
from llm_jax.train import run_record
from llm_jax.train.checkpoint import Checkpointer, start_params
from llm_jax.train.config_checks import check_config
from llm_jax.train.guard import DivergenceGuard, TrainingDiverged  # noqa: F401 - TrainingDiverged: the loop's error
from llm_jax.train.harness import Harness
from llm_jax.train.metrics import log_line, read_metrics
from llm_jax.train.optimizer import make_optimizer, trainable_of, trainable_rule
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


def build_training(config, model_cfg: ModelConfig, mesh, rules, objective) -> Training:
    """The model, optimizer, state shardings and jitted steps of `objective` (an objectives/ module)."""
    options = getattr(objective, "model_options", lambda _: {})(config)
    model = getattr(objective, "model_class", Transformer)(model_cfg, mesh, rules, **options)
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


def _checked(config, devices=None) -> tuple[ModelConfig, jax.sharding.Mesh, tuple]:
    """(model config, mesh, rules) of a config that passed every check made before building: `validate`, the mesh
    (over `devices`, default all), the rules and the batch against them."""
    model_cfg = validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh_rules)
    sharding.check_batch(config.data.batch_size, config.data.seq_len, mesh, rules, config.optim.grad_accum)
    return model_cfg, mesh, rules


def memory_before_launch(config, objective, devices=None) -> memory.MemoryReport:
    """The per-device memory of `config`'s train step (train/memory.py), compiled on abstract shapes: no weights,
    data or tokenizer, and the same checks as `run` first. `llm-jax memory` prints it. `devices`: those the mesh
    is built over (default every device, as for a run)."""
    model_cfg, mesh, rules = _checked(config, devices)
    memory.abstract_batch(config, objective, mesh, rules)  # an objective it cannot measure fails before building
    t = build_training(config, model_cfg, mesh, rules, objective)
    return memory.measure(t, config, objective, mesh, rules)[0]


def run(config, workdir: str, objective, generative_evals=None) -> dict:
    """Trains (or resumes) the run `config` describes in `workdir` with `objective` (an objectives/ module, looked
    up by name above this layer: llm_jax/training.py). `generative_evals`: the evaluations of
    `config.train.generative_evals`, built by eval/during_training.py `training_evals(config)`, called with the
    params at every eval."""
    if config.train.get("generative_evals") and generative_evals is None:
        raise ConfigError("train.generative_evals names evaluations but none were passed to the training loop: "
                          "build them with llm_jax.eval.during_training.training_evals(config), as `llm-jax train` "
                          "does")
    # Everything that can be checked is checked before anything is written to the workdir.
    model_cfg, mesh, rules = _checked(config)
    harness = Harness(config, workdir)
    if config.train.init_from and not harness.resuming:
        run_record.check_lineage(config, config.train.init_from)
    harness.open()
    tokenizer = prepare_tokenizer(config, workdir, vocab_size=model_cfg.vocab_size, fresh=not harness.resuming)
    data = objective.build_data(config, tokenizer, workdir)

    t = build_training(config, model_cfg, mesh, rules, objective)
    # Compiled here, on abstract shapes, for the memory report; the steps call this executable, so the step is
    # compiled once (a batch of another shape or dtype is an error rather than a silent second compilation).
    step_memory, compiled_step = memory.measure(t, config, objective, mesh, rules)
    t = dataclasses.replace(t, train_step=compiled_step)
    if generative_evals:  # prompts rendered and judges loaded now: bad ones fail before the first step
        if type(t.model) is not Transformer:
            raise ConfigError(f"train.generative_evals: a {config.objective} model does not generate")
        generative_evals.bind(t.model, tokenizer, mesh, rules)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
    train_iter = data.train_iterator()
    if harness.resuming:
        state = checkpointer.restore(t.abstract_state, train_iter)
        harness.resumed(int(state.step))
    elif config.train.init_from:
        params_from_run = getattr(objective, "params_from_run", start_params)
        # A LoRA model takes the run's weights as its base (quantized here if model.base_quant says so); its
        # adapters start fresh (B = 0: no change yet), or continue those of a run with the same quantized base.
        params = params_from_run(config.train.init_from, t.abstract_state.params, model_cfg)
        state = t.create_state(params)
        harness.started(init_from=config.train.init_from)
        log_line(f"started from the params of {config.train.init_from}")
    else:
        state = t.create_state()
        harness.started()
    steps = _Steps(config, objective, t, data, state, train_iter, checkpointer, mesh, rules, generative_evals)
    start = int(state.step)
    counts = flops.param_counts(model_cfg)
    lora_metrics, lora_line = lora.training_report(t.abstract_state.params, t.optimizer, trainable_of(t.optimizer),
                                                   config.optim.grad_accum)
    # The LoRA report's memory_* metrics are whole-model estimates; the step-0 metrics carry the compiled step's
    # per-device figures under those names instead (its log line keeps the comparison with full fine-tuning).
    lora_metrics = {k: v for k, v in lora_metrics.items() if not k.startswith("memory_")}

    def constants(h: Harness) -> None:
        if start == 0:
            h.write(0, {"n_params": counts["total"], "n_params_kaplan": counts["kaplan"],
                        "flops_per_token": steps.flops_per_step / steps.tokens_per_step, "peak_flops": steps.peak,
                        **{k: v for k, v in data.stats.items() if isinstance(v, (int, float))}, **lora_metrics,
                        "n_params_trainable": step_memory.n_params_trainable, **step_memory.metrics()})

    if lora_line:
        log_line(lora_line)
    log_line(f"{model_cfg.n_layers} layers, {counts['total']:,} params, mesh "
             f"{dict(mesh.shape)}, {steps.tokens_per_step:,} tokens/step; MFU against {steps.peak_source}")
    log_line(step_memory.line())
    return harness.run(steps, start, before=constants)


def sequences_per_row(objective, config) -> int:
    """Forward sequences of seq_len in one batch row: the objective's `sequences_per_row` (a number, or a
    function of the config), 1 without one."""
    value = getattr(objective, "sequences_per_row", 1)
    return int(value(config) if callable(value) else value)


class _Steps:
    """The LM-style loop's steps on the harness (train/harness.py `Loop`): a pass over the objective's batches.

    Metrics stay on the device until a log, eval or save step needs them (`pending`), so steps never wait on the
    host; every fetched step goes through the divergence guard, which stops a run that is not finite or spikes.
    Throughput leaves out the first step (the step is compiled before it, but its first call still warms up) and
    the time spent evaluating and saving."""

    eval_at_start = False

    def __init__(self, config, objective, t: Training, data, state, train_iter, checkpointer, mesh, rules,
                 generative_evals):
        self.config, self.objective, self.t, self.data = config, objective, t, data
        self.state, self.train_iter, self.checkpointer = state, train_iter, checkpointer
        self.mesh, self.rules, self.generative_evals = mesh, rules, generative_evals
        self.total, self.start = config.train.steps, int(state.step)
        self.checkpoint_dir = checkpointer.directory
        self.last_saved = checkpointer.latest_step()
        self.guard = DivergenceGuard(config.train)
        self.pending: list[tuple[int, dict]] = []
        self.interval = dict(start=time.perf_counter(), steps=0, paused=0.0)
        model_cfg = t.model.cfg
        self.tokens_per_step = config.data.batch_size * config.data.seq_len * sequences_per_row(objective, config)
        self.flops_per_step = flops.training_flops_per_token(model_cfg, config.data.seq_len) * self.tokens_per_step
        self.peak, self.peak_source = hardware.peak_flops(model_cfg.dtype)
        n_eval = config.train.eval_batches if config.train.eval_batches > 0 else sys.maxsize
        # Named eval sets (a mixture's components) are evaluated each on its own and their means, weighted as the
        # data says, are the overall metrics; without them the overall metrics come from the whole held-out set.
        self.eval_names = list(data.eval_sets) if data.eval_weights else [""]
        self.eval_batches = {name: [sharding.global_batch_from_local(b, mesh, rules)
                                    for b in data.eval_batches(n_eval, name)] for name in self.eval_names}

    def step(self, step: int) -> None:
        batch = sharding.global_batch_from_local(next(self.train_iter), self.mesh, self.rules)
        self.state, metrics = self.t.train_step(self.state, batch)
        self.pending.append((step, metrics))
        if step == self.start + 1:  # leave the first call out of the throughput figures
            jax.block_until_ready(metrics)
            self.interval.update(start=time.perf_counter(), steps=0, paused=0.0)
        else:
            self.interval["steps"] += 1

    def _drain(self) -> dict:
        """Fetches pending metrics through the divergence guard, returns the last step's metrics."""
        fetched = jax.device_get(self.pending)
        self.pending.clear()
        for at, metrics in fetched:
            self.guard.check(at, float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["lr"]),
                             self.last_saved, self.checkpoint_dir)
        return {k: float(v) for k, v in fetched[-1][1].items()} if fetched else {}

    def metrics(self, step: int) -> dict:
        logged = self._drain()
        elapsed = time.perf_counter() - self.interval["start"] - self.interval["paused"]
        if self.interval["steps"]:
            logged["tokens_per_s"] = self.interval["steps"] * self.tokens_per_step / elapsed
            logged["mfu"] = self.interval["steps"] * self.flops_per_step / elapsed / self.peak
        logged["tokens"] = step * self.tokens_per_step
        self.interval.update(start=time.perf_counter(), steps=0, paused=0.0)
        return logged

    def _paused(self, fn, *args):
        """Runs fn with its time left out of the throughput (training time ends where the state is ready)."""
        jax.block_until_ready(self.state)
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.interval["paused"] += time.perf_counter() - began

    def _eval_means(self, params, batches) -> dict:
        # One batch at a time, each waited on: independent eval programs in flight together may run their
        # collectives in a different order on each host (a deadlock seen with 2 CPU processes over gloo).
        sums: dict = {}
        for batch in batches:
            for key, value in jax.device_get(self.t.eval_step(params, batch)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        weight = max(float(sums.pop("weight")), 1.0)
        return {f"eval_{k}": float(v) / weight for k, v in sums.items()}

    def _evaluate(self, step: int) -> dict:
        params, objective, data = self.state.params, self.objective, self.data
        generated = self.generative_evals(params) if self.generative_evals else {}
        means = {name: self._eval_means(params, batches) for name, batches in self.eval_batches.items()}
        if "" in means:
            result = objective.finish_eval(means[""])
        else:
            first = self.eval_names[0]
            result = objective.finish_eval({k: sum(w * means[name][k] for name, w in data.eval_weights.items())
                                            for k in means[first]})
            for name, named in means.items():  # eval_loss of set "domain" is logged as eval_domain_loss
                result.update({f"eval_{name}_{k[len('eval_'):]}": v for k, v in objective.finish_eval(named).items()})
        return {**result, **generated, "tokens": step * self.tokens_per_step}

    def evaluate(self, step: int) -> dict:
        return self._paused(self._evaluate, step)

    def _save(self) -> bool:
        self._drain()
        if self.guard.spiking:
            log_line(f"step {int(self.state.step)}: no checkpoint while a loss spike is open (since step "
                     f"{self.guard.open_since})")
            return False
        self.checkpointer.save(self.state, self.train_iter)
        self.last_saved = int(self.state.step)
        return True

    def save(self, step: int) -> bool:
        return self._paused(self._save)

    def finish(self) -> dict:
        self._drain()
        logged = read_metrics(self.checkpointer.workdir)
        out = dict(step=int(self.state.step), final_loss=_last(logged, "loss"))
        for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):  # a finished run, rerun, reports its last eval
            if _last(logged, key) is not None:
                out[key] = _last(logged, key)
        return out

    def close(self) -> None:
        self.checkpointer.close()


def _last(metrics: list[dict], key: str):
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None
