"""Run configuration: what a run folder computes, read from TOML or JSON and checked key by key.

A config names the model folder, the training data to score, how the concept is made (a probe trained on
positive/negative texts at a hook, or a saved direction), the curvature, the estimator and the report::

    [model]
    path = "models/small"            # a folder written by save_model or Hugging Face save_pretrained
    dtype = "bfloat16"               # optional: float32, bfloat16 or float16 (default auto: as saved)

    [data]
    train = "data/train.jsonl"       # chats to score: .jsonl(.gz), .parquet, .arrow or a save_to_disk folder
    max_length = 256

    [probe]
    hook = "blocks.1.hook_resid_post"
    positive = "data/reckless.jsonl"
    negative = "data/careful.jsonl"

    [scoring]
    estimator = "concept_influence"

Relative paths are relative to the config file's folder. Unknown keys, wrong types and bad choices are
errors that name the key. The ``[factors]`` and ``[scoring]`` sections are the fields of
:class:`~concept_influence.curvature.CurvatureSettings` and :class:`~concept_influence.scoring.ScoringSettings`
plus the keys only a run folder needs; ``concept-influence run --help`` lists them with their help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes import PROBE_KINDS, REDUCTIONS

from .concepts import DEFAULT_QUERY
from .curvature import CurvatureSettings
from .estimators import RUN_ESTIMATORS
from .models import MODEL_DTYPES
from .models.hugging_face import TRACK_CHOICES
from .scoring import ScoringSettings
from .settings import Settings, check_value, narrowed, option

__all__ = ["ConfigError", "RunConfig", "FactorsConfig", "ScoringConfig", "settings_help"]


class ConfigError(ValueError):
    """A run config cannot be used; the message names the file and the key."""


@dataclass
class ModelConfig(Settings):
    """``path``: model folder (:func:`concept_influence.models.load_model`), or a PEFT adapter folder on top of
    ``base``; ``device``: auto, cpu or cuda; ``dtype``: what the model computes in (auto: the dtype its weights were
    saved in); ``track``: the weight matrices of a LoRA fine-tune that are tracked."""

    path: str = option(path=True)
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "convert the weights on loading; covariances, eigenvalues and scores are accumulated "
                                "in float32 whatever the model's dtype", choices=("auto", *MODEL_DTYPES))
    base: str | None = option(None, "base model folder of a PEFT adapter (default: the one the adapter names)", path=True)
    track: str = option("auto", "LoRA factors (lora), full weight matrices (full), or lora when the model has LoRA "
                        "adapters (auto)", choices=TRACK_CHOICES)


@dataclass
class DataConfig(Settings):
    """``train``: the chats to score (any source :func:`~concept_influence.data.read_chats` reads by path: chat
    JSONL, Parquet, Arrow or a folder written by ``Dataset.save_to_disk``). Examples whose response is cut away at
    ``max_length`` are skipped (``skip_truncated``) or are an error."""

    train: str = option(path=True)
    max_length: int = option(512, minimum=1)
    skip_truncated: bool = True


@dataclass
class ProbeConfig(Settings):
    """The concept direction at ``hook``: a probe of ``kind`` trained on ``positive`` vs ``negative``
    texts (at most ``max_examples`` each), or the saved ``direction`` file."""

    hook: str
    positive: str | None = option(None, path=True)
    negative: str | None = option(None, path=True)
    direction: str | None = option(None, path=True)
    kind: str = option("diff_means", choices=PROBE_KINDS)
    reduction: str = option("response_mean", choices=REDUCTIONS)
    max_examples: int | None = None
    seed: int = 0


@dataclass
class ConceptConfig(Settings):
    """f(θ) = the projection on the direction, read at the query's tokens (``reduction``: the last prompt token by
    default) and averaged over ``eval`` (default: the probe's positive texts), at most ``max_examples`` of them."""

    eval: str | None = option(None, path=True)
    max_examples: int = 256
    reduction: str = option(DEFAULT_QUERY, choices=REDUCTIONS)


@dataclass
class FactorsConfig(CurvatureSettings):
    """``[factors]``: the curvature for ``concept_influence``, fitted as :class:`CurvatureSettings` say (K-FAC or
    EK-FAC only) on the training data streamed in shards, or read from ``path``."""

    strategy: str = narrowed(CurvatureSettings, "strategy", ("ekfac", "kfac"))
    max_examples: int | None = option(None, "fit on the first max_examples training examples; unset: all")
    shard_size: int = option(1024, "examples per shard; a checkpoint is written after each", minimum=1)
    path: str | None = option(None, "a saved curvature folder to use instead of fitting one", path=True)

    def settings(self) -> CurvatureSettings:
        """The settings :func:`~concept_influence.curvature.fit_curvature` takes."""
        return self.project(CurvatureSettings)


@dataclass
class ScoringConfig(ScoringSettings):
    """``[scoring]``: which estimator scores the training data, in shards, as :class:`ScoringSettings` say."""

    estimator: str = option("concept_influence", "the estimator that scores the training data", choices=RUN_ESTIMATORS)
    shard_size: int = option(1024, "examples per score shard (one file each; a resumed run restarts at the first "
                                   "missing shard)", minimum=1)

    def settings(self) -> ScoringSettings:
        """The settings the gradient estimators score with."""
        return self.project(ScoringSettings)


def settings_help() -> list[str]:
    """One line per key of the ``[factors]`` and ``[scoring]`` sections, with its default and help text."""
    return FactorsConfig.help_lines("factors.") + ScoringConfig.help_lines("scoring.")


@dataclass
class ReportConfig(Settings):
    """How many top- and bottom-ranked examples the report shows."""

    top_k: int = option(20, minimum=1)


@dataclass
class RunConfig:
    """Everything a run computes. ``out`` is the run folder (``--out`` overrides it)."""

    model: ModelConfig
    data: DataConfig
    probe: ProbeConfig
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    factors: FactorsConfig = field(default_factory=FactorsConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    out: str | None = option(None, path=True)

    def __post_init__(self) -> None:
        p = self.probe
        if p.direction is None and (p.positive is None or p.negative is None):
            raise ConfigError("probe: give either `direction` (a saved direction) or both `positive` and `negative`")

    @property
    def concept_eval(self) -> str:
        """The texts f is averaged over."""
        source = self.concept.eval or self.probe.positive
        if source is None:
            raise ConfigError("concept.eval is needed when the probe is a saved direction (no positive texts)")
        return source

    def to_dict(self) -> dict[str, Any]:
        """The config as a nested JSON-ready dict (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", base: Path | None = None) -> "RunConfig":
        """Build from a nested dict; relative paths are resolved against ``base``."""
        return _build(cls, data, source, "", base)

    @classmethod
    def read(cls, path: str | Path) -> "RunConfig":
        """Read a ``.toml`` or ``.json`` config file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                raise ConfigError(f"{path}: a config must be .toml or .json")
        except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError(f"{path}: cannot parse ({e})") from None
        return cls.from_dict(data, str(path), path.resolve().parent)


def _accepts(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _build(cls, data: Any, source: str, prefix: str, base: Path | None):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing key '{key}'")
            continue
        value, hint = data[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, f"{key}.", base)
            continue
        if not _accepts(value, hint):
            raise ConfigError(f"{source}: '{key}' must be {_describe(hint)}, got {value!r}")
        problem = check_value(key, value, f)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        if f.metadata.get("path") and value is not None and base is not None:
            value = str((base / value).resolve()) if not Path(value).is_absolute() else value
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ValueError as e:  # a check of a settings class across fields, e.g. the damping
        raise ConfigError(f"{source}: {prefix}{e}") from None


def _describe(hint: Any) -> str:
    args = typing.get_args(hint) or (hint,)
    return " or ".join("null" if a is type(None) else {str: "a string", int: "an integer", float: "a number",
                                                       bool: "true/false"}.get(a, a.__name__) for a in args)
