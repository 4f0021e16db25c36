"""Reward model: the SFT trunk plus a scalar head, trained on pairwise preferences (Bradley–Terry).

    readout "last":        r(x, y) = w · h_last + b
    readout "likelihood":  r(x, y) = w · h_last + b + Σ_{t ∈ y} log p_θ(y_t | x, y_<t)
    loss = −log σ(r(x, y_better) − r(x, y_worse) − m)      (m = `reward.margin`, 0 by default)

over every ordered pair of every record: a pair, a pair with an edited answer (edited > chosen > rejected), or
a ranking of several answers (data/records.py), each pair counting once in the mean.

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

Layouts (`reward.layout`, data/preference_rows.py). "pairs": one pair per row, both answers' sequences in one
forward pass. "packed": a prompt and up to `reward.responses_per_row` of its answers in one row, each answer
attending to the prompt and itself only, the reward read at each answer's end marker and the loss taken over
the row's pairs: the same scores and gradients as the pairs layout (tested), the prompt encoded once for all its
comparisons and each answer once for all its pairs.

Metrics (means over pairs): `accuracy` (the better answer scored above the worse), `margin` (r_b − r_w),
`reward_mean` and `reward_std` over both answers of each pair. `RewardScorer` (`load_scorer(run_dir)`) scores new answers for PPO,
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
from llm_jax.data.preference_rows import build_preference_data, check_layout, pair_rows
from llm_jax.data.records import Message
from llm_jax.model.transformer import Transformer, dropout_rngs
from llm_jax.objectives import fmt
from llm_jax.objectives import lm
from llm_jax.objectives.lm import token_log_probs
from llm_jax.train import step as train_step
from llm_jax.train.checkpoint import CannotStartFrom, CheckpointError, start_params
from llm_jax.train.metrics import log_line

HEAD_PARAMS = ("reward_head", "reward_bias")
READOUTS = ("last", "likelihood")
CONFIG_SECTION = "reward"
CONFIG_DEFAULTS = dict(
    margin=0.0,            # Bradley–Terry: −log σ(r_better − r_worse − margin), every pair of a record
    readout="last",        # last: w·h_last + b | likelihood: plus the answer's log-likelihood under the
                           # trunk's own LM head (objectives/reward.py: what a small trunk needs)
    layout="pairs",        # pairs: one pair per row | packed: a prompt and several answers per row
    responses_per_row=8,   # packed: answers in one row at most (a record with more is split over rows)
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

    def score_packed(self, tokens_bt, positions_bt, segment_ids_bt, response_last_br, targets_bt=None,
                     answer_mask_bt=None, readout: str = "last"):
        """(B, R) f32 rewards of the R answers packed in each row (data/preference_rows.py): w · h + b at each
        answer's last token `response_last_br`, with readout "likelihood" plus Σ answer_mask · log p(target)
        over the answer's own segment (segment id r + 1)."""
        hidden_btd = self(tokens_bt, positions_bt, segment_ids_bt)
        h_brd = jnp.take_along_axis(hidden_btd, response_last_br[:, :, None], axis=1).astype(jnp.float32)
        head_br = h_brd @ self.reward_head.astype(jnp.float32) + self.reward_bias.astype(jnp.float32)
        if readout == "last":
            return head_br
        check_readout(readout)
        terms_bt = token_log_probs(self.head(hidden_btd), targets_bt) * answer_mask_bt
        slots_r = jnp.arange(response_last_br.shape[1]) + 1
        in_answer_brt = segment_ids_bt[:, None, :] == slots_r[None, :, None]
        return head_br + jnp.sum(jnp.where(in_answer_brt, terms_bt[:, None, :], 0.0), axis=2)

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


def layout_of(config) -> tuple[str, int]:
    """(reward.layout, reward.responses_per_row), checked."""
    section = config.get("reward", {})
    layout, per_row = str(section.get("layout", "pairs")), int(section.get("responses_per_row", 8))
    check_layout(layout, per_row)
    if layout == "packed" and int(config.model.get("prompt_tuning_tokens", 0)):
        raise ValueError("reward.layout=packed shares the prompt segment that a soft prompt "
                         "(model.prompt_tuning_tokens) takes; use reward.layout=pairs with prompt tuning")
    return layout, per_row


def sequences_per_row(config) -> int:
    """Forward sequences of seq_len per batch row: a pair's two, or one packed row."""
    return 1 if layout_of(config)[0] == "packed" else 2


def model_options(config) -> dict:
    """Packed rows hold a prompt segment every answer attends to (model/transformer.py `shared_prefix`)."""
    return dict(shared_prefix=layout_of(config)[0] == "packed")


def abstract_batch(config) -> dict:
    """One global train batch as shapes and dtypes, for `llm-jax memory`: pairs, the language model's (B, T)
    arrays once per side under `chosen_<key>` and `rejected_<key>`; packed, one set of them plus the rows'
    answer ends (B, R) and pairs (B, Q) (data/preference_rows.py)."""
    one_side = lm.abstract_batch(config)
    layout, per_row = layout_of(config)
    if layout == "pairs":
        return {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in one_side.items()}
    b, q = config.data.batch_size, per_row * (per_row - 1) // 2
    return {**one_side, "response_last": jax.ShapeDtypeStruct((b, per_row), jnp.int32),
            **{k: jax.ShapeDtypeStruct((b, q), jnp.int32) for k in ("pair_better", "pair_worse")},
            "pair_valid": jax.ShapeDtypeStruct((b, q), jnp.float32)}


def pair_loss(better, worse, valid, margin: float):
    """The summed Bradley–Terry loss and metric sums of pairs (any shape), `valid` 0 on padding."""
    diff = better - worse
    stats = dict(weight=jnp.sum(valid), accuracy=jnp.sum((diff > 0) * valid), margin=jnp.sum(diff * valid),
                 reward_mean=jnp.sum((better + worse) / 2 * valid),
                 reward_sq=jnp.sum((better ** 2 + worse ** 2) / 2 * valid))
    return jnp.sum(bradley_terry_loss(better, worse, margin) * valid), stats


def make_loss_fn(model: RewardModel, margin: float, readout: str = "last", layout: str = "pairs"):
    def pairs_loss(params, batch, rng):
        rewards = model.apply(params, *(both_sides(batch, k) for k in ("inputs", "positions", "segment_ids",
                                                                       "targets", "loss_mask")),
                              readout=readout, method=RewardModel.score, rngs=dropout_rngs(rng))
        chosen_b, rejected_b = jnp.split(rewards, 2)
        valid_b = (jnp.sum(batch["chosen_segment_ids"], axis=1) > 0).astype(jnp.float32)  # eval padding rows: 0
        return pair_loss(chosen_b, rejected_b, valid_b, margin)

    def packed_loss(params, batch, rng):
        rewards_br = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                 batch["response_last"], batch["targets"], batch["loss_mask"], readout=readout,
                                 method=RewardModel.score_packed, rngs=dropout_rngs(rng))
        better_bq = jnp.take_along_axis(rewards_br, batch["pair_better"], axis=1)
        worse_bq = jnp.take_along_axis(rewards_br, batch["pair_worse"], axis=1)
        return pair_loss(better_bq, worse_bq, batch["pair_valid"], margin)

    return packed_loss if layout == "packed" else pairs_loss


def _loss_fn(config, model):
    margin = float(config.get("reward", {}).get("margin", 0.0))
    return make_loss_fn(model, margin, readout_of(config), layout_of(config)[0])


def make_train_step(config, model, optimizer, schedule):
    return train_step.make_train_step(_loss_fn(config, model), optimizer, schedule, config.optim.grad_accum)


def make_eval_step(config, model):
    return train_step.make_eval_step(_loss_fn(config, model))


def finish_eval(metrics: dict) -> dict:
    out = dict(metrics)
    variance = out.pop("eval_reward_sq") - out["eval_reward_mean"] ** 2
    out["eval_reward_std"] = math.sqrt(max(variance, 0.0))
    return out


def table_row(metrics: dict, summary: dict) -> str:
    del summary
    return f"held-out pair accuracy {fmt(metrics.get('eval_accuracy'))}, margin {fmt(metrics.get('eval_margin'))}"


def build_data(config, tokenizer, workdir: str):
    readout_of(config)  # a bad readout or layout fails before any data is rendered
    layout, per_row = layout_of(config)
    return build_preference_data(config, tokenizer, workdir, layout, per_row, log=log_line)


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
