"""An RL run's settings: `config.rl` (defaults and each field's meaning in objectives/rl.py) checked field by field.

    settings(config) -> RLSettings        every bad value named, before anything is built or written

What an algorithm is here: an advantage estimator by name (rl/advantages.py), the policy loss's options
(rl/policy_loss.py), and the sampling choices (samples per prompt, dynamic sampling, overlong handling). The
presets in configs/ppo.py, grpo.py, rloo.py and reinforce_pp.py are settings of these fields, not code.

What pays (`rl.reward`): a comma list of terms `spec` or `spec=weight` (weight 1 when left out), each the reward
model (`reward_model`: the reward run's score, standardised by its own eval statistics with
`rl.normalize_score`) or a judge of eval/judges.py by its spec (gold, exact_match, numeric_match,
regex_match, a reward run's directory read as a judge, a user's module:function). The paid score of a
response is Σ weight·term, minus `rl.unfinished_penalty` when it never stopped, plus DAPO's soft overlong
penalty with `rl.overlong="penalty"`.
"""
from __future__ import annotations

import dataclasses

from llm_jax.eval.judges import JudgeError, load_judge
from llm_jax.rl import advantages, losses
from llm_jax.rl.policy_loss import PolicyLossOptions

REWARD_MODEL = "reward_model"  # the reward-model term of rl.reward; every other term is a judge spec
VALUE_FROM = ("reward", "policy", "none")
REWARD_SHAPINGS = ("final", "dense")
ROLLOUTS = ("static", "continuous")
OVERLONG = ("none", "filter", "penalty")


def parse_reward(spec: str) -> tuple[tuple[str, float], ...]:
    """`rl.reward` as ((term spec, weight), ...); ValueError naming a malformed term."""
    terms = []
    for part in spec.split(","):
        part = part.strip()
        name, sep, weight = part.rpartition("=") if "=" in part else (part, "", "")
        if not name.strip():
            raise ValueError(f"rl.reward={spec!r}: empty term {part!r}; terms are spec or spec=weight, comma-separated")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"rl.reward={spec!r}: the weight of {name.strip()!r} is {weight!r}, not a number") from None
        terms.append((name.strip(), value))
    names = [n for n, _ in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"rl.reward={spec!r} names a term twice")
    return tuple(terms)


@dataclasses.dataclass(frozen=True)
class RLSettings:
    reward: str
    reward_run: str
    reference_run: str
    estimator: str
    value_from: str
    prompts: str
    eval_prompts: str
    n_eval_prompts: int
    rollout_batch: int
    samples_per_prompt: int
    minibatch: int
    epochs: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    rollout: str
    rollout_slots: int
    kl_coef: float
    kl_estimator: str
    kl_control: str
    kl_target: float
    kl_horizon: float
    kl_loss_coef: float
    kl_loss_estimator: str
    gamma: float
    lam: float
    clip_eps: float
    clip_eps_high: float
    ratio: str
    aggregation: str
    value_clip: float
    entropy_coef: float
    tis_cap: float
    whiten_advantages: bool
    normalize_score: bool
    unfinished_penalty: float
    overlong: str
    overlong_cache: int
    dynamic_sampling: bool
    max_sampling_rounds: int
    value_lr: float
    reward_shaping: str
    ptx_coef: float
    ptx_data: str
    ptx_batch: int

    @property
    def updates_per_iteration(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch)

    @property
    def reward_terms(self) -> tuple[tuple[str, float], ...]:
        return parse_reward(self.reward)

    @property
    def uses_reward_model(self) -> bool:
        return any(name == REWARD_MODEL for name, _ in self.reward_terms)

    @property
    def value_model(self) -> bool:
        """Whether the run trains a value model: only when its estimator needs one."""
        return advantages.get_estimator(self.estimator).needs_value_model and self.value_from != "none"

    @property
    def loss_options(self) -> PolicyLossOptions:
        return PolicyLossOptions(clip_eps_low=self.clip_eps, clip_eps_high=self.clip_eps_high or self.clip_eps,
                                 ratio=self.ratio, aggregation=self.aggregation, max_tokens=self.max_new_tokens,
                                 kl_in_loss_coef=self.kl_loss_coef, kl_estimator=self.kl_loss_estimator,
                                 entropy_coef=self.entropy_coef, tis_cap=self.tis_cap)


def reward_judge(spec: str):
    """The judge a term of `rl.reward` names (eval/judges.py load_judge); ValueError naming the option."""
    try:
        return load_judge(spec)
    except JudgeError as e:
        raise ValueError(f"rl.reward term {spec!r}: {e}") from None


def _named(field: str, error: ValueError) -> ValueError:
    return ValueError(f"rl.{field}: {error}")


def settings(config) -> RLSettings:
    """`config.rl` checked field by field (module docstring); every bad value is named."""
    r = config.rl
    s = RLSettings(**{f.name: r[f.name] for f in dataclasses.fields(RLSettings)})
    s = dataclasses.replace(s, reference_run=s.reference_run or config.train.init_from)
    if not config.train.init_from:
        raise ValueError("RL starts from a policy: set train.init_from to an SFT run directory")
    if not s.reward:
        raise ValueError(f'rl.reward is empty: "{REWARD_MODEL}" and/or judges (gold, numeric_match, module:function, '
                         '...), e.g. "numeric_match" or "reward_model=1,gold=0.5"')
    terms = s.reward_terms
    for spec, _ in terms:  # a judge that does not load is named before the tokenizer, data or models
        if spec != REWARD_MODEL:
            reward_judge(spec)
    if s.uses_reward_model and not s.reward_run:
        raise ValueError(f'rl.reward={s.reward!r} pays the reward model: set rl.reward_run to a reward run directory')
    if s.reward_shaping not in REWARD_SHAPINGS:
        raise ValueError(f"rl.reward_shaping={s.reward_shaping!r} is not one of {REWARD_SHAPINGS}")
    if s.reward_shaping == "dense" and len(terms) > 1:
        raise ValueError(f'rl.reward_shaping="dense" splits one score over the tokens; rl.reward={s.reward!r} has '
                         f"{len(terms)} terms")
    if s.value_from not in VALUE_FROM:
        raise ValueError(f"rl.value_from={s.value_from!r} is not one of {VALUE_FROM}")
    try:  # before anything that reads the estimator (`value_model`), so a bad name is named as the field
        advantages.check_estimator(s.estimator, has_value_model=s.value_from != "none", group=s.samples_per_prompt)
    except ValueError as e:
        raise _named("estimator", e) from None
    if s.value_from == "reward" and s.value_model and not s.reward_run:
        raise ValueError('rl.value_from="reward" starts the value model from the reward run, and rl.reward_run is '
                         'empty: set it, or rl.value_from="policy"')
    try:
        s.loss_options  # noqa: B018 - validates every loss option
    except ValueError as e:
        raise _named("loss", e) from None
    if s.samples_per_prompt < 1 or s.rollout_batch % s.samples_per_prompt:
        raise ValueError(f"rl.rollout_batch={s.rollout_batch} must be a multiple of rl.samples_per_prompt="
                         f"{s.samples_per_prompt} (>= 1)")
    if s.dynamic_sampling and s.samples_per_prompt < 2:
        raise ValueError("rl.dynamic_sampling drops groups whose rewards are all equal, which needs "
                         f"rl.samples_per_prompt >= 2, got {s.samples_per_prompt}")
    if s.max_sampling_rounds < 1:
        raise ValueError(f"rl.max_sampling_rounds must be >= 1, got {s.max_sampling_rounds}")
    if s.rollout not in ROLLOUTS:
        raise ValueError(f"rl.rollout={s.rollout!r} is not one of {ROLLOUTS}")
    if s.rollout_slots < 0:
        raise ValueError(f"rl.rollout_slots must be >= 0 (0: rl.rollout_batch), got {s.rollout_slots}")
    if s.overlong not in OVERLONG:
        raise ValueError(f"rl.overlong={s.overlong!r} is not one of {OVERLONG}")
    if not 0 <= s.overlong_cache <= s.max_new_tokens:
        raise ValueError(f"rl.overlong_cache={s.overlong_cache} must be in [0, rl.max_new_tokens={s.max_new_tokens}]")
    if s.ptx_coef < 0 or (s.ptx_coef > 0 and (s.ptx_batch < 1 or not s.ptx_data)):
        raise ValueError(f"rl.ptx_coef={s.ptx_coef} must be >= 0, and > 0 needs rl.ptx_data (got "
                         f"{s.ptx_data!r}) and rl.ptx_batch >= 1 (got {s.ptx_batch})")
    if s.kl_estimator not in losses.KL_ESTIMATORS:
        raise ValueError(f"rl.kl_estimator={s.kl_estimator!r} is not one of {losses.KL_ESTIMATORS}")
    losses.make_kl_controller(s.kl_control, s.kl_coef, s.kl_target, s.kl_horizon)  # names a bad kind or target
    for name in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "n_eval_prompts"):
        if getattr(s, name) < 1:
            raise ValueError(f"rl.{name} must be >= 1, got {getattr(s, name)}")
    if s.rollout_batch % s.minibatch:
        raise ValueError(f"rl.rollout_batch={s.rollout_batch} is not a multiple of rl.minibatch={s.minibatch}")
    if s.kl_coef < 0 or s.value_clip < 0:
        raise ValueError(f"rl.kl_coef={s.kl_coef} and rl.value_clip={s.value_clip} must be >= 0")
    if not (0.0 <= s.gamma <= 1.0 and 0.0 <= s.lam <= 1.0):
        raise ValueError(f"rl.gamma={s.gamma} and rl.lam={s.lam} must be in [0, 1]")
    if s.temperature <= 0:
        raise ValueError(f"rl.temperature must be > 0 (RL needs a sampling policy), got {s.temperature}")
    return s
