"""The steps of data preparation, built from a config: per-document filters and transforms, then deduplication.

    privacy        scrub e-mail addresses, phone numbers and IPs, or drop the document (privacy.py)
    heuristics     Gopher quality and repetition rules and C4's terminal punctuation (heuristics.py)
    langid         keep documents in the wanted languages (langid.py)
    blocklist      drop documents with blocked words (heuristics.py)
    quality_classifier   drop documents a fastText-style quality classifier scores below its threshold
    toxicity_classifier  drop documents a toxicity classifier scores at or above its threshold (classifier.py;
                         both trained by `llm-jax classifier`, llm_jax/data/prepare/classifier_stage.py)
    exact_dedup    drop exact duplicates of an earlier document (dedup.py ExactIndex)
    minhash_dedup  drop near duplicates of an earlier document (dedup.py MinHashIndex)

Each step reads its own config section (`config.<step>`), whose fields are those of the block's config dataclass
(for heuristics: `quality` and `repetition`; for the classifier steps: `model`, the path of a classifier.npz,
`threshold`, None for the one saved with the model, and `pooling`, document or max_paragraph). The per-document
steps come first, in the configured order, so that deduplication keeps the first clean copy of a group and never
keeps a copy that a filter would drop.

A per-document step returns an `Outcome`: the text after it, keep or drop with the reason, the scores the report
histograms, and the rule that dropped it. The dedup steps need every earlier document, so they are not per-document
steps: prepare_stage.py runs them in one ordered pass (see there).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import os
from typing import Any, Callable

from llm_jax.config_lib import ConfigError
from llm_jax.data.prepare import classifier, dedup, heuristics, langid, privacy
from llm_jax.files import file_sha256

CLASSIFIER_STEPS = ("quality_classifier", "toxicity_classifier")
PER_DOCUMENT_STEPS = ("privacy", "heuristics", "langid", "blocklist") + CLASSIFIER_STEPS
DEDUP_STEPS = ("exact_dedup", "minhash_dedup")
STEPS = PER_DOCUMENT_STEPS + DEDUP_STEPS


@dataclasses.dataclass(frozen=True)
class Outcome:
    text: str                        # the document after the step (only privacy changes it)
    keep: bool
    reason: str = ""                 # why it was dropped, e.g. "words 12 < min 50"
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    rule: str = ""                   # the rule that dropped it; the step's name for single-rule steps
    counts: dict[str, int] = dataclasses.field(default_factory=dict)   # privacy: matches per kind


def _tuples(value: Any) -> Any:
    """Lists (as overrides give them) to tuples, all the way down: the config dataclasses are frozen and hashed."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def dataclass_from_section(cls, section: dict, name: str):
    """`cls(**section)`, with unknown fields and invalid values reported as ConfigErrors naming `config.<name>`."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ConfigError(f"config.{name} has no field {unknown[0]!r}; known: {list(defaults)}")
    values = {}
    for key, value in section.items():
        value = _tuples(value)
        if isinstance(value, str) and not isinstance(defaults[key], str):
            # An override of a field whose default is None (a rule switched off) arrives as text.
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config.{name}.{key}: {value!r} is not a Python literal") from None
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{name}: {e}") from e


def _privacy(config: privacy.PrivacyConfig) -> Callable[[str], Outcome]:
    def apply(text: str) -> Outcome:
        result = privacy.scrub_pii(text, config)
        dropped_kind = next((k for k in privacy.KINDS if getattr(config, k) == "drop" and result.counts.get(k)), "")
        return Outcome(result.text, result.keep, result.reason, {"pii_matches": float(sum(result.counts.values()))},
                       dropped_kind, result.counts)
    return apply


def _verdicts_outcome(text: str, verdicts: list[heuristics.Verdict]) -> Outcome:
    failed = next((v for v in verdicts if not v.keep), None)
    return Outcome(text, failed is None, failed.reason if failed else "", {v.rule: float(v.score) for v in verdicts},
                   failed.rule if failed else "")


def _heuristics(quality: heuristics.GopherQualityConfig,
                repetition: heuristics.GopherRepetitionConfig) -> Callable[[str], Outcome]:
    def apply(text: str) -> Outcome:
        doc = heuristics.Document.from_text(text)
        return _verdicts_outcome(text, heuristics.gopher_quality(doc, quality)
                                 + heuristics.gopher_repetition(doc, repetition))
    return apply


def _langid(config: langid.LanguageFilterConfig) -> Callable[[str], Outcome]:
    return lambda text: _verdicts_outcome(text, [langid.language_filter(text, config)])


def _blocklist(config: heuristics.BlocklistConfig) -> Callable[[str], Outcome]:
    return lambda text: _verdicts_outcome(text, [heuristics.blocklist(heuristics.Document.from_text(text), config)])


@dataclasses.dataclass(frozen=True)
class ClassifierFilterConfig:
    """A classifier step's config section: the model file, a threshold that overrides the model's own, and how a
    document is scored (classifier.POOLINGS: its mean, or its highest-scoring paragraph)."""
    model: str = ""
    threshold: float | None = None
    pooling: str = "document"

    def __post_init__(self):
        if not isinstance(self.model, str):
            raise TypeError(f"model must be the path of a classifier.npz, got {self.model!r}")
        if self.pooling not in classifier.POOLINGS:
            raise ValueError(f"pooling must be one of {classifier.POOLINGS}, got {self.pooling!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool) or
                                           not isinstance(self.threshold, (int, float)) or
                                           not 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be None (the model's own) or in [0, 1], got {self.threshold!r}")


@dataclasses.dataclass(frozen=True)
class ClassifierStep:
    """A classifier step as planned: the model by path and content, the threshold in force, which side drops."""
    model: str
    sha256: str
    threshold: float
    drop_at_or_above: bool      # toxicity: a high score drops; quality: a low one
    pooling: str


def _plan_classifier(name: str, config: ClassifierFilterConfig) -> ClassifierStep:
    if not config.model:
        raise ConfigError(f"config.steps has {name!r} but config.{name}.model is empty: train a classifier with "
                          f"`llm-jax classifier` and set config.{name}.model to its classifier.npz")
    try:
        model = classifier.load_classifier(config.model)
    except classifier.ModelFileError as e:
        raise ConfigError(f"config.{name}.model: {e}") from None
    threshold = model.threshold if config.threshold is None else float(config.threshold)
    return ClassifierStep(os.path.abspath(config.model), file_sha256(config.model), threshold,
                          name == "toxicity_classifier", config.pooling)


@functools.lru_cache(maxsize=4)
def _load_checked(path: str, sha256: str) -> classifier.Classifier:
    """The model a worker scores with, refused if the file changed since the run was planned."""
    now = file_sha256(path)
    if now != sha256:
        raise ConfigError(f"classifier {path} changed during the run (sha256 {sha256[:12]}… planned, "
                          f"{now[:12]}… now)")
    return classifier.load_classifier(path)


def _classifier(name: str, step: ClassifierStep) -> Callable[[str], Outcome]:
    model = _load_checked(step.model, step.sha256)
    score_name = name.removesuffix("_classifier")

    def apply(text: str) -> Outcome:
        score = model.score(text, step.pooling)
        if step.drop_at_or_above and score >= step.threshold:
            return Outcome(text, False, f"{score_name} {score:.3f} >= threshold {step.threshold:g}",
                           {score_name: score}, name)
        if not step.drop_at_or_above and score < step.threshold:
            return Outcome(text, False, f"{score_name} {score:.3f} < threshold {step.threshold:g}",
                           {score_name: score}, name)
        return Outcome(text, True, scores={score_name: score})
    return apply


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Every step's settings as plain, picklable values, checked once; `document_steps` builds the callables."""
    steps: tuple[str, ...]
    settings: dict[str, Any]

    @property
    def document_step_names(self) -> tuple[str, ...]:
        return tuple(s for s in self.steps if s in PER_DOCUMENT_STEPS)

    @property
    def dedup_step_names(self) -> tuple[str, ...]:
        return tuple(s for s in self.steps if s in DEDUP_STEPS)

    @property
    def model_sha256(self) -> dict[str, str]:
        """{classifier step: its model file's sha256}: what the step computes depends on the file's content."""
        return {name: self.settings[name].sha256 for name in self.steps if name in CLASSIFIER_STEPS}

    @property
    def minhash(self) -> dedup.MinHashConfig | None:
        return self.settings.get("minhash_dedup")

    def document_steps(self) -> list[tuple[str, Callable[[str], Outcome]]]:
        builders = {"privacy": lambda: _privacy(self.settings["privacy"]),
                    "heuristics": lambda: _heuristics(*self.settings["heuristics"]),
                    "langid": lambda: _langid(self.settings["langid"]),
                    "blocklist": lambda: _blocklist(self.settings["blocklist"])}
        builders.update({name: functools.partial(_classifier, name, self.settings.get(name))
                         for name in CLASSIFIER_STEPS})
        return [(name, builders[name]()) for name in self.document_step_names]


def _section(config, name: str) -> dict:
    section = config.get(name)
    return {} if section is None else dict(section.to_dict() if hasattr(section, "to_dict") else section)


def plan_steps(config) -> StepPlan:
    """The configured steps, checked: known names, none twice, dedup after every per-document step."""
    steps = tuple(_tuples(config.steps))
    if isinstance(config.steps, str) or not all(isinstance(s, str) for s in steps):
        raise ConfigError(f"config.steps must be a tuple of step names, got {config.steps!r}")
    for name in steps:
        if name not in STEPS:
            raise ConfigError(f"config.steps: unknown step {name!r}; known: {list(STEPS)}")
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise ConfigError(f"config.steps names {twice[0]!r} twice: {steps}")
    seen_dedup = [s for s in steps if s in DEDUP_STEPS]
    late = [s for s in steps[steps.index(seen_dedup[0]):] if s in PER_DOCUMENT_STEPS] if seen_dedup else []
    if late:
        raise ConfigError(f"config.steps: {late[0]!r} comes after {seen_dedup[0]!r}; deduplication must follow every "
                          f"per-document step (got {steps})")
    settings: dict[str, Any] = {}
    for name in steps:
        section = _section(config, name)
        if name == "privacy":
            settings[name] = dataclass_from_section(privacy.PrivacyConfig, section, name)
        elif name == "heuristics":
            unknown = sorted(set(section) - {"quality", "repetition"})
            if unknown:
                raise ConfigError(f"config.heuristics has no field {unknown[0]!r}; known: ['quality', 'repetition']")
            settings[name] = (
                dataclass_from_section(heuristics.GopherQualityConfig, section.get("quality", {}),
                                       "heuristics.quality"),
                dataclass_from_section(heuristics.GopherRepetitionConfig, section.get("repetition", {}),
                                       "heuristics.repetition"))
        elif name == "langid":
            settings[name] = dataclass_from_section(langid.LanguageFilterConfig, section, name)
        elif name == "blocklist":
            settings[name] = dataclass_from_section(heuristics.BlocklistConfig, section, name)
        elif name in CLASSIFIER_STEPS:
            settings[name] = _plan_classifier(name, dataclass_from_section(ClassifierFilterConfig, section, name))
        elif name == "minhash_dedup":
            settings[name] = dataclass_from_section(dedup.MinHashConfig, section, name)
        elif section:
            raise ConfigError(f"config.{name} takes no settings, got {sorted(section)}")
    return StepPlan(steps, settings)
