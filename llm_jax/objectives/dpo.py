"""Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference, with IPO and cDPO options.

With π the policy, π_ref the reference (the SFT run by default) and log π(y|x) summed over the answer's
tokens (its content and end marker),

    h      = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)]
    sigmoid (DPO):  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)     (ε = label_smoothing: conservative DPO)
    ipo:            (h − 1/(2β))²                            (Azar et al. 2023)
    + nll_coef · (−log π(y_c|x) / |y_c|)     the chosen answer's per-token NLL (Llama 3; Pang et al. 2024)

Pairs: every ordered pair of every record (data/records.py): a record's pair, a pair with an edited answer
(edited > chosen > rejected: three pairs), or a ranking of several answers (k(k−1)/2 pairs without ties), one
pair per row (data/preference_rows.py); y_c below is a pair's better answer, y_r its worse.

The NLL term counters likelihood displacement. The preference losses only see differences, so both
answers' log-probs can fall together. Measured on the embedded task at the tiny size, with β 0.1 and no NLL
term, the chosen answer's log-prob fell by ~6 nats and the greedy gold score dropped below the SFT model's.

For a fixed prompt and Bradley–Terry preferences P(y ≻ y') = σ(r(y) − r(y')), the sigmoid loss is minimised
by π*(y) ∝ π_ref(y)·exp(r(y)/β) (tested on a bandit in tests/objectives/test_dpo.py).

The reference log-probs are computed once, before training, for every train and eval pair, and cached in
the run's data dir keyed by the pairs and the reference checkpoint; they ride in the batches as
`ref_chosen_logp` and `ref_rejected_logp`, so the train step sees one model and a resumed run does not
recompute them.

Metrics (means over pairs): `rewards_chosen` = β·(log π − log π_ref)(y_c), `rewards_rejected`, `accuracy`
(rewards_chosen > rewards_rejected), `margin` (their difference), and `kl_to_reference`: the mean over both
answers of log π(y|x) − log π_ref(y|x), a drift measure on the preference data (a KL estimate only where the
answers are samples of π).

Config (`config.dpo`): beta, label_smoothing, loss ("sigmoid" | "ipo"), nll_coef, reference (a run dir; empty:
the run's `train.init_from`). `chosen_nll` is logged with the other metrics.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.data.lm_data import LMData
from llm_jax.data.post_training import data_cache_dir, rows_fingerprint
from llm_jax.data.preference_rows import render_preferences
from llm_jax.model.transformer import Transformer, dropout_rngs
from llm_jax.objectives import fmt, gold_text
from llm_jax.objectives.lm import token_log_probs
from llm_jax.objectives import reward
from llm_jax.objectives.reward import both_sides
from llm_jax.train import step as train_step
from llm_jax.train.checkpoint import intact_step

LOSSES = ("sigmoid", "ipo")
sequences_per_row = 2  # each row is a pair: two forward sequences
REFERENCE_KEYS = ("ref_chosen_logp", "ref_rejected_logp")

CONFIG_SECTION = "dpo"
CONFIG_DEFAULTS = dict(
    beta=0.1,              # strength of the KL anchor to the reference
    label_smoothing=0.0,   # cDPO: assumed fraction of flipped preference labels, in [0, 0.5)
    loss="sigmoid",        # sigmoid (DPO) | ipo
    nll_coef=0.0,          # + nll_coef · the chosen answer's per-token NLL (Llama 3 used 0.2)
    reference="",          # the frozen reference run; empty: train.init_from
)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
             loss: str = "sigmoid"):
    """Per-pair loss from sequence log-probs; see the module docstring."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"dpo.loss={loss!r} is not one of {LOSSES}")


def sequence_log_probs(model: Transformer, params, batch: dict, rng=None):
    """(chosen (B,), rejected (B,)): Σ log π(answer token) over each side's loss mask, in one forward pass."""
    logits = model.apply(params, both_sides(batch, "inputs"), both_sides(batch, "positions"),
                         both_sides(batch, "segment_ids"), method=Transformer.logits, rngs=dropout_rngs(rng))
    per_token = token_log_probs(logits, both_sides(batch, "targets")) * both_sides(batch, "loss_mask")
    return jnp.split(jnp.sum(per_token, axis=1), 2)


def _settings(config) -> dict:
    d = config.get("dpo", {})
    settings = dict(beta=float(d.get("beta", 0.1)), label_smoothing=float(d.get("label_smoothing", 0.0)),
                    loss=str(d.get("loss", "sigmoid")), nll_coef=float(d.get("nll_coef", 0.0)))
    if settings["nll_coef"] < 0:
        raise ValueError(f"dpo.nll_coef must be >= 0, got {settings['nll_coef']}")
    if settings["loss"] not in LOSSES:
        raise ValueError(f"dpo.loss={settings['loss']!r} is not one of {LOSSES}")
    if settings["beta"] <= 0:
        raise ValueError(f"dpo.beta must be positive, got {settings['beta']}")
    if not 0.0 <= settings["label_smoothing"] < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {settings['label_smoothing']}")
    return settings


def abstract_batch(config) -> dict:
    """One global train batch as shapes and dtypes: the reward model's pairs plus the reference's cached
    sequence log-probs, (B,) each (`REFERENCE_KEYS`), for `llm-jax memory`."""
    rows = (config.data.batch_size,)
    return {**reward.abstract_batch(config), **{k: jax.ShapeDtypeStruct(rows, jnp.float32) for k in REFERENCE_KEYS}}


def make_loss_fn(model: Transformer, beta: float, label_smoothing: float, loss: str, nll_coef: float = 0.0):
    def loss_fn(params, batch, rng):
        pi_c, pi_r = sequence_log_probs(model, params, batch, rng)
        chosen_nll = -pi_c / jnp.maximum(jnp.sum(batch["chosen_loss_mask"], axis=1), 1.0)
        ref_c, ref_r = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        valid = (jnp.sum(batch["chosen_segment_ids"], axis=1) > 0).astype(jnp.float32)  # eval padding rows: 0
        rewards_c, rewards_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
        stats = dict(weight=jnp.sum(valid), rewards_chosen=jnp.sum(rewards_c * valid),
                     rewards_rejected=jnp.sum(rewards_r * valid),
                     accuracy=jnp.sum((rewards_c > rewards_r) * valid),
                     margin=jnp.sum((rewards_c - rewards_r) * valid),
                     kl_to_reference=jnp.sum(((pi_c - ref_c) + (pi_r - ref_r)) / 2 * valid),
                     chosen_nll=jnp.sum(chosen_nll * valid))
        per_pair = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing, loss) + nll_coef * chosen_nll
        return jnp.sum(per_pair * valid), stats
    return loss_fn


def make_train_step(config, model, optimizer, schedule):
    return train_step.make_train_step(make_loss_fn(model, **_settings(config)), optimizer, schedule,
                                      config.optim.grad_accum)


def make_eval_step(config, model):
    return train_step.make_eval_step(make_loss_fn(model, **_settings(config)))


def finish_eval(metrics: dict) -> dict:
    return metrics


def table_row(metrics: dict, summary: dict) -> str:
    del summary
    return f"{gold_text(metrics)}; held-out pair accuracy {fmt(metrics.get('eval_accuracy'))}"


def reference_run(config) -> str:
    ref = config.get("dpo", {}).get("reference", "") or config.train.init_from
    if not ref:
        raise ValueError("DPO needs a reference model: set dpo.reference or train.init_from to an SFT run directory")
    return ref


def reference_log_probs(run_dir: str, rows: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Σ log π_ref over each answer of every row, computed in batches on the local devices."""
    from llm_jax.runs import load_run
    ref = load_run(run_dir)
    fn = jax.jit(lambda p, b: sequence_log_probs(ref.model, p, b))
    n = len(rows["chosen_inputs"])
    out = {k: np.zeros(n, np.float32) for k in REFERENCE_KEYS}
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in rows.items()}
        m = len(chunk["chosen_inputs"])
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, axis=0)]) for k, v in chunk.items()}
        chosen, rejected = jax.device_get(fn(ref.params, chunk))
        out["ref_chosen_logp"][start:start + m] = chosen[:m]
        out["ref_rejected_logp"][start:start + m] = rejected[:m]
    return out


def _with_reference(rows: dict, run_dir: str, cache_dir: str, batch_size: int) -> dict:
    latest = intact_step(run_dir)
    key = rows_fingerprint({**rows, "_ref": np.frombuffer(
        json.dumps([os.path.realpath(run_dir), latest]).encode(), np.uint8)})  # a link: the run it names
    path = os.path.join(cache_dir, f"dpo-reference-{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as cached:
            logps = {k: cached[k] for k in REFERENCE_KEYS}
    else:
        logps = reference_log_probs(run_dir, rows, batch_size)
        if jax.process_index() == 0:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.tmp.{os.getpid()}.npz"
            np.savez(tmp, **logps)
            os.replace(tmp, path)
    return {**rows, **logps}


def build_data(config, tokenizer, workdir: str) -> LMData:
    _settings(config)
    train_rows, eval_rows, stats = render_preferences(config, tokenizer, workdir)
    run_dir = reference_run(config)
    cache_dir = data_cache_dir(config, workdir)
    batch = int(config.data.batch_size)
    train_rows = _with_reference(train_rows, run_dir, cache_dir, batch)
    eval_rows = _with_reference(eval_rows, run_dir, cache_dir, batch)
    stats.update(ref_chosen_logp_mean=float(train_rows["ref_chosen_logp"].mean()),
                 ref_rejected_logp_mean=float(train_rows["ref_rejected_logp"].mean()))
    return LMData(train_rows, eval_rows, seed=config.seed, global_batch_size=batch,
                  process_index=jax.process_index(), process_count=jax.process_count(), stats=stats)
