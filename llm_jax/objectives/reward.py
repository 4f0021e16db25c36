"""Reward model: the SFT trunk plus a scalar head, trained on pairwise preferences (Bradley–Terry).

    readout "last":        r(x, y) = w · h_last + b
    readout "likelihood":  r(x, y) = w · h_last + b + Σ_{t ∈ y} log p_θ(y_t | x, y_<t)
    loss = −log σ(r(x, y_chosen) − r(x, y_rejected) − m)      (m = `reward.margin`, 0 by default)

h_last is the final hidden state at the last token of prompt + answer: the end marker closing the answer
(the eos after it is a target, never an input), so r has read the whole answer including the decision to
stop. The head starts at zero.

`reward.readout` picks the form. "last" is the InstructGPT reward model. "likelihood" adds the answer's
log-likelihood under the reward model's own language-model head (the trunk's tied unembedding: no new
params), so the untrained reward model already ranks answers as the SFT model does and training corrects
it. A small trunk needs this. Judging an answer means comparing each answer token with what the prompt
implies. The trunk already does that comparison when it predicts the next token. A scalar read at one
position has to rebuild it from scratch. Measured on the embedded task at the `tiny` size
(experiments/post_training/README.md): with "last", held-out pair accuracy stays near 0.75 after 400 steps,
and the model is at chance on pairs whose answers have equal length (it judges by length alone). With
"likelihood" it reaches 0.93 after 100 steps.

Metrics (means over pairs): `accuracy` (chosen scored above rejected), `margin` (r_c − r_r), `reward_mean`
and `reward_std` over both answers. `RewardScorer` (`load_scorer(run_dir)`) scores new answers for PPO,
rejection sampling and evaluation.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llm_jax.data import chat
from llm_jax.data.post_training import build_preference_data, pair_rows
from llm_jax.data.records import Message
from llm_jax.model.transformer import Transformer, dropout_rngs
from llm_jax.objectives import fmt
from llm_jax.objectives import lm
from llm_jax.objectives.lm import token_log_probs
from llm_jax.train import step as train_step
from llm_jax.train.checkpoint import CannotStartFrom, CheckpointError, start_params

HEAD_PARAMS = ("reward_head", "reward_bias")
READOUTS = ("last", "likelihood")
sequences_per_row = 2  # each row is a pair: two forward sequences

CONFIG_SECTION = "reward"
CONFIG_DEFAULTS = dict(
    margin=0.0,            # Bradley–Terry: −log σ(r_chosen − r_rejected − margin)
    readout="last",        # last: w·h_last + b | likelihood: plus the answer's log-likelihood under the
                           # trunk's own LM head (objectives/reward.py: what a small trunk needs)
)


class RewardModel(Transformer):
    """A Transformer with a scalar head; its trunk params have exactly the language model's paths."""

    def setup(self):
        super().setup()
        self.reward_head = self.param("reward_head", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                                      (self.cfg.d_model,), self.cfg.weights_dtype)
        self.reward_bias = self.param("reward_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()),
                                      (), self.cfg.weights_dtype)

    def score(self, tokens_bt, positions_bt, segment_ids_bt, targets_bt=None, answer_mask_bt=None,
              readout: str = "last"):
        """(B,) f32 rewards read at each row's last real token (segment id > 0); with readout "likelihood"
        plus Σ answer_mask · log p(target), the answer's log-likelihood (module docstring)."""
        head_b, terms_bt = self.score_terms(tokens_bt, positions_bt, segment_ids_bt, targets_bt, answer_mask_bt,
                                            readout)
        return head_b + jnp.sum(terms_bt, axis=1)

    def score_terms(self, tokens_bt, positions_bt, segment_ids_bt, targets_bt=None, answer_mask_bt=None,
                    readout: str = "last"):
        """The score in its parts: (head_b, terms_bt) with score = head_b + Σ_t terms_bt. head_b is w · h_last + b;
        terms_bt is answer_mask · log p(target) for readout "likelihood" (one term per answer token, which PPO
        can pay token by token), zeros for "last"."""
        hidden_btd = self(tokens_bt, positions_bt, segment_ids_bt)
        last_b = jnp.maximum(jnp.sum(segment_ids_bt > 0, axis=1) - 1, 0)
        h_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        head_b = h_bd @ self.reward_head.astype(jnp.float32) + self.reward_bias.astype(jnp.float32)
        if readout == "last":
            return head_b, jnp.zeros(tokens_bt.shape, jnp.float32)
        check_readout(readout)
        if targets_bt is None or answer_mask_bt is None:
            raise ValueError('reward readout "likelihood" needs the targets and the answer mask')
        log_probs_bt = token_log_probs(self.head(hidden_btd), targets_bt)
        return head_b, log_probs_bt * answer_mask_bt


model_class = RewardModel


def check_readout(readout: str) -> str:
    if readout not in READOUTS:
        raise ValueError(f"reward.readout={readout!r} is not one of {READOUTS}")
    return readout


def readout_of(config) -> str:
    return check_readout(str(config.get("reward", {}).get("readout", "last")))


def both_sides(batch: dict, key: str):
    """Chosen rows then rejected rows, (2B, ...): one forward pass for the pair."""
    return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)


def bradley_terry_loss(chosen_b, rejected_b, margin: float = 0.0):
    """−log σ(r_c − r_r − m) per pair."""
    return jax.nn.softplus(-(chosen_b - rejected_b - margin))


def abstract_batch(config) -> dict:
    """One global train batch of pairs as shapes and dtypes: the language model's (B, T) arrays once per side,
    under `chosen_<key>` and `rejected_<key>` (data/post_training.py `pair_rows`), for `llm-jax memory`."""
    one_side = lm.abstract_batch(config)
    return {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in one_side.items()}


def make_loss_fn(model: RewardModel, margin: float, readout: str = "last"):
    def loss_fn(params, batch, rng):
        rewards = model.apply(params, *(both_sides(batch, k) for k in ("inputs", "positions", "segment_ids",
                                                                       "targets", "loss_mask")),
                              readout=readout, method=RewardModel.score, rngs=dropout_rngs(rng))
        chosen_b, rejected_b = jnp.split(rewards, 2)
        valid_b = (jnp.sum(batch["chosen_segment_ids"], axis=1) > 0).astype(jnp.float32)  # eval padding rows: 0
        diff_b = chosen_b - rejected_b
        stats = dict(weight=jnp.sum(valid_b), accuracy=jnp.sum((diff_b > 0) * valid_b),
                     margin=jnp.sum(diff_b * valid_b), reward_mean=jnp.sum((chosen_b + rejected_b) / 2 * valid_b),
                     reward_sq=jnp.sum((chosen_b ** 2 + rejected_b ** 2) / 2 * valid_b))
        return jnp.sum(bradley_terry_loss(chosen_b, rejected_b, margin) * valid_b), stats
    return loss_fn


def _margin(config) -> float:
    return float(config.get("reward", {}).get("margin", 0.0))


def make_train_step(config, model, optimizer, schedule):
    return train_step.make_train_step(make_loss_fn(model, _margin(config), readout_of(config)), optimizer,
                                      schedule, config.optim.grad_accum)


def make_eval_step(config, model):
    return train_step.make_eval_step(make_loss_fn(model, _margin(config), readout_of(config)))


def finish_eval(metrics: dict) -> dict:
    out = dict(metrics)
    variance = out.pop("eval_reward_sq") - out["eval_reward_mean"] ** 2
    out["eval_reward_std"] = math.sqrt(max(variance, 0.0))
    return out


def table_row(metrics: dict, summary: dict) -> str:
    del summary
    return f"held-out pair accuracy {fmt(metrics.get('eval_accuracy'))}, margin {fmt(metrics.get('eval_margin'))}"


def build_data(config, tokenizer, workdir: str):
    readout_of(config)  # a bad readout fails before any data is rendered
    return build_preference_data(config, tokenizer, workdir)


def params_from_run(run_dir: str, abstract_params, model_cfg):
    """The trunk from an LM run (SFT), with a fresh zero head; or everything from a reward run (either through
    `start_params`: quantized, merged or carried as the two runs' configs say)."""
    top = abstract_params["params"]
    trunk = {"params": {k: v for k, v in top.items() if k not in HEAD_PARAMS}}
    try:
        return start_params(run_dir, abstract_params, model_cfg)
    except CannotStartFrom:
        raise
    except CheckpointError:  # not a reward run: restore the trunk and start the head at zero
        restored = start_params(run_dir, trunk, model_cfg)
    head = {k: jax.device_put(jnp.zeros(top[k].shape, top[k].dtype), top[k].sharding) for k in HEAD_PARAMS}
    return {"params": {**restored["params"], **head}}


@dataclasses.dataclass
class RewardScorer:
    """Scores answers to prompts with a trained reward model (batched, jitted once per padded length)."""
    model: RewardModel
    params: object
    tokenizer: object
    template: str
    max_len: int
    batch_size: int = 32
    readout: str = "last"
    _jitted: object = dataclasses.field(default=None, init=False, repr=False)

    def score_tokens(self, sequences: list[np.ndarray], response_starts: list[int]) -> np.ndarray:
        """Rewards of full token sequences (prompt + answer + end + eos, as `chat.render_pair` renders them);
        `response_starts[i]` is the length of sequence i's prompt (where its answer starts)."""
        if len(response_starts) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(response_starts)} response starts")
        for i, (seq, start) in enumerate(zip(sequences, response_starts)):
            if len(seq) - 1 > self.max_len:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; the reward model reads at most "
                                 f"{self.max_len + 1} (its data.seq_len + 1)")
            if not 1 <= start < len(seq):
                raise ValueError(f"sequence {i} of {len(seq)} tokens cannot have its answer start at {start}")
        score = self._score_fn()
        out = []
        for begin in range(0, len(sequences), self.batch_size):
            chunk = list(zip(sequences, response_starts))[begin:begin + self.batch_size]
            n = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - n)  # one compiled shape for every batch
            rows = sequence_rows([c[0] for c in chunk], self.max_len, [c[1] for c in chunk])
            args = (rows[k] for k in ("inputs", "positions", "segment_ids", "targets", "loss_mask"))
            out.append(np.asarray(score(self.params, *args))[:n])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _score_fn(self):
        """The jitted scorer, built once: every batch has the same padded shape, so it compiles once."""
        if self._jitted is None:
            self._jitted = jax.jit(lambda p, *rows: self.model.apply(p, *rows, readout=self.readout,
                                                                    method=RewardModel.score))
        return self._jitted

    def score(self, prompts, answers) -> np.ndarray:
        """Rewards of text answers to prompts (each prompt a string or a list of records.Message)."""
        sequences, starts = [], []
        for prompt, answer in zip(prompts, answers):
            messages = [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)
            prompt_ids = chat.render_prompt(messages, self.tokenizer, self.template)
            sequences.append(np.concatenate([prompt_ids, chat.render_response(answer, self.tokenizer, self.template),
                                             [self.tokenizer.eos_id]]).astype(np.int32))
            starts.append(len(prompt_ids))
        return self.score_tokens(sequences, starts)


def sequence_rows(sequences: list[np.ndarray], seq_len: int, response_starts: list[int]) -> dict[str, np.ndarray]:
    """Model inputs (inputs, targets, positions, segment_ids, loss_mask) of whole sequences, padded to seq_len."""
    masks = [chat.answer_mask(len(s), start) for s, start in zip(sequences, response_starts)]
    rows = pair_rows([chat.RenderedPair(s, s, s, 0, m, m) for s, m in zip(sequences, masks)], seq_len)
    return {k[len("chosen_"):]: v for k, v in rows.items() if k.startswith("chosen_")}


def load_scorer(run_dir: str, batch_size: int = 32) -> RewardScorer:
    from llm_jax.runs import load_run
    run = load_run(run_dir, model_cls=RewardModel)
    template = run.config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
    return RewardScorer(run.model, run.params, run.tokenizer, template, int(run.config.data.seq_len), batch_size,
                        readout_of(run.config))
