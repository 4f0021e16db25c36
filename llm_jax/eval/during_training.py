"""Generative evaluations during training: a judge's score of the model's answers, logged like the loss.

    c.train.generative_evals.gold = dict(prompts="default_task", judge="gold", n_prompts=64)
    c.train.generative_evals.math = dict(prompts="math_eval.jsonl", judge="numeric_match", max_new_tokens=32)

Every `train.eval_every` steps (with the held-out loss) each named evaluation answers its prompts with the
params of that step and has its judge score the answers; the loop logs, to metrics.jsonl and TensorBoard,

    eval_<name>_score     the judge's mean score over the prompts it judges
    eval_<name>_stopped   the fraction of answers that ended with a stop token before max_new_tokens

Fields of one evaluation (EVAL_FIELDS, defaults in DEFAULTS): `prompts` (a prompts spec as `llm-jax generate`
reads, or `default_task`: the embedded task's held-out prompts), `judge` (any spec of eval/judges.py: gold,
exact_match, regex_match, numeric_match, module:function, a reward run), `n_prompts` (the first n; 0: all),
`max_new_tokens`, `temperature` (0: greedy), `seed`, `batch_size`, `chat_template` (False: each prompt is
plain text, for base models).

Everything that can be checked is checked when the loop is built, before the first step: the fields, the judge
(it must load) and the prompts (read and rendered with the run's tokenizer, each failing with its file:line).
The answers are a pure function of (params, seed), so a resumed run logs the same scores as an uninterrupted one.

The train loop (train/loop.py) takes the evaluations as an argument, `run(config, workdir,
generative_evals=training_evals(config))`: the evaluation package builds on training, not the other way round.
`llm-jax train` and the pipeline pass them; a config that names evaluations is refused by a loop given none.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from llm_jax.config_lib import ConfigError
from llm_jax.data import chat
from llm_jax.data.post_training import resolve_spec
from llm_jax.eval.judges import JudgeError, load_judge
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import answer_prompts, batch_shards, judge_rows, read_prompts

DEFAULTS = dict(prompts="default_task", judge="gold", n_prompts=64, max_new_tokens=32, temperature=0.0, seed=0,
                batch_size=32, chat_template=True)
EVAL_FIELDS = tuple(DEFAULTS)


@dataclasses.dataclass(frozen=True)
class GenerativeEval:
    name: str
    prompts: str
    judge: str
    n_prompts: int
    max_new_tokens: int
    temperature: float
    seed: int
    batch_size: int
    chat_template: bool


def eval_specs(config) -> list[GenerativeEval]:
    """`config.train.generative_evals` checked field by field (ConfigError naming the evaluation and field)."""
    specs = []
    for name, fields in (config.train.get("generative_evals") or {}).items():
        fields = dict(fields)
        unknown = sorted(set(fields) - set(EVAL_FIELDS))
        if unknown:
            raise ConfigError(f"train.generative_evals.{name} has unknown fields {unknown}; known: {list(EVAL_FIELDS)}")
        spec = GenerativeEval(name, **{**DEFAULTS, **fields})
        for field in ("n_prompts", "max_new_tokens", "batch_size"):
            value = getattr(spec, field)
            if not isinstance(value, int) or value < (0 if field == "n_prompts" else 1):
                raise ConfigError(f"train.generative_evals.{name}.{field}={value!r} must be an integer >= "
                                  f"{0 if field == 'n_prompts' else 1}")
        if not math.isfinite(spec.temperature) or spec.temperature < 0:
            raise ConfigError(f"train.generative_evals.{name}.temperature={spec.temperature!r} must be >= 0")
        specs.append(spec)
    return specs


class _Bound:
    """One evaluation's judge and rendered prompts, ready to answer with any params of the run's model."""

    def __init__(self, spec: GenerativeEval, judge, model, tokenizer, template: str, context: int, shards: int):
        self.spec, self.judge, self.model, self.tokenizer, self.shards = spec, judge, model, tokenizer, shards
        stops = chat.stop_ids(tokenizer, template) if spec.chat_template else tokenizer.eos_ids
        self.sampling = SamplingConfig(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                       stop_ids=tuple(stops))
        prompts = read_prompts(resolve_spec(spec.prompts, "prompts", "eval"), tokenizer, template=template,
                               max_len=context, judge=judge, chat_template=spec.chat_template)
        self.prompts = prompts[:spec.n_prompts] if spec.n_prompts else prompts
        if not any(p.scored for p in self.prompts):
            raise ConfigError(f"train.generative_evals.{spec.name}: judge {judge.name!r} judges none of the "
                              f"{len(self.prompts)} prompts of {spec.prompts!r}")
        self.batch_size = -(-spec.batch_size // shards) * shards  # rows divide over the mesh's batch shards

    def __call__(self, params) -> dict:
        rows, _ = answer_prompts(self.model, params, self.prompts, self.sampling, self.tokenizer,
                                 batch_size=self.batch_size, seed=self.spec.seed, shards=self.shards)
        scores = judge_rows(self.judge, self.prompts, rows)
        name = self.spec.name
        return {f"eval_{name}_score": float(np.mean(scores)),
                f"eval_{name}_stopped": float(np.mean([r["stopped"] for r in rows]))}


class TrainingEvals:
    """The named generative evaluations of a train config; `bind` them to the run's model, then call with params."""

    def __init__(self, config):
        self.specs = eval_specs(config)
        try:
            self.judges = [load_judge(s.judge, batch_size=s.batch_size) for s in self.specs]
        except JudgeError as e:
            raise ConfigError(f"train.generative_evals: {e}") from None
        self.template = config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
        self.context = int(config.data.seq_len)
        self._bound: list[_Bound] = []

    def __bool__(self) -> bool:
        return bool(self.specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def bind(self, model, tokenizer, mesh=None, rules=None) -> None:
        """Renders every evaluation's prompts with the run's tokenizer (bad prompts fail here, before training)
        and loads reward-model judges."""
        shards = batch_shards(mesh, rules)
        self._bound = [_Bound(spec, judge, model, tokenizer, self.template, self.context, shards)
                       for spec, judge in zip(self.specs, self.judges)]
        for judge in self.judges:
            if hasattr(judge, "load"):
                judge.load()

    def __call__(self, params) -> dict:
        if len(self._bound) != len(self.specs):
            raise RuntimeError("TrainingEvals called before bind(model, tokenizer)")
        metrics = {}
        for bound in self._bound:
            metrics.update(bound(params))
        return metrics


def training_evals(config) -> TrainingEvals | None:
    """The config's generative evaluations for train/loop.py's `run`, or None when it names none."""
    evals = TrainingEvals(config)
    return evals if evals else None
