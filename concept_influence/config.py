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
:class:`~concept_influence.curvature.CurvatureSettings` and :class:`~concept_influence.engine.ScoringSettings`
plus the keys only a run folder needs; ``concept-influence run --help`` lists them with their help text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes import PROBE_KINDS, REDUCTIONS

from .concept_spec import CONCEPT_TYPES, ConceptSpec
from .curvature import CurvatureSettings
from .curvature.optimizer_state import POWERS
from .curvature.registry import RUN_STRATEGIES
from .engine import ScoringSettings
from .errors import ConceptInfluenceError
from .estimators import RUN_ESTIMATORS
from .models import MODEL_DTYPES
from .models.hugging_face import parse_track
from .options import Settings, build_settings, narrowed, option
from .plan import parse_device_memory

__all__ = ["ConfigError", "RunConfig", "FactorsConfig", "ScoringConfig", "settings_help", "MIN_PROBE_AUROC", "GATE_KEYS"]

#: A trained probe whose held-out AUROC is below this is refused (``probe.allow_weak`` or ``--allow-weak-probe`` to go
#: on): 0.5 is chance, and at 0.6 the two sets of texts are barely told apart.
MIN_PROBE_AUROC = 0.6
#: Keys that only allow or stop a stage and change no number: an existing run folder takes new values for them.
GATE_KEYS = ("probe.allow_weak", "concept.require", "model.device_memory", "scoring.require")


class ConfigError(ConceptInfluenceError, ValueError):
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
    track: str | dict = option("auto", "LoRA factors (lora), full matrices (full), lora when the model has LoRA adapters "
                               "(auto), one kind (attention, mlp), or a table {weights, kinds, names, blocks}")
    device_memory: str = option("auto", "checked against the run's memory plan before any work: auto (a CUDA device's "
                                "memory; no check on the CPU), none, or a size such as \"80GiB\"")
    checkpoints: str | list | None = option(
        None, "score at these checkpoints and sum: a list of checkpoint folders or files and \"base\" (the base model "
              "of a PEFT adapter, or [model] base), or \"auto\" (path is a TRL output folder: the base, then every "
              "checkpoint-N in step order); unset: the model alone", path=True)
    weights: str | list | None = option(None, "each checkpoint's multiplier in the sum: numbers, or \"lr\" (the "
                                              "learning rate at its step, from trainer_state.json); unset: 1 each")

    def check_together(self) -> None:
        # checked now, so a bad value is an error naming its key (models.hugging_face.parse_track reads `track`)
        _ = parse_track(self.track), parse_device_memory(self.device_memory)
        c, w = self.checkpoints, self.weights
        if isinstance(c, str) and c != "auto":
            raise ValueError(f'checkpoints must be "auto" or a list of checkpoints, got {c!r}')
        if isinstance(c, list) and (not c or not all(isinstance(x, str) for x in c)):
            raise ValueError(f'checkpoints must be a non-empty list of paths or "base", got {c!r}')
        if w is not None and c is None:
            raise ValueError("weights multiply the scores of each checkpoint; give checkpoints too")
        if isinstance(w, str) and w != "lr":
            raise ValueError(f'weights must be "lr" or a list of numbers, got {w!r}')
        if isinstance(w, list) and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
            raise ValueError(f"weights must be a list of numbers, got {w!r}")
        if isinstance(w, list) and isinstance(c, list) and len(w) != len(c):
            raise ValueError(f"weights: {len(w)} weights for {len(c)} checkpoints")


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
    allow_weak: bool = option(False, f"go on with a probe whose held-out AUROC is below {MIN_PROBE_AUROC} (refused "
                                     "otherwise: it cannot tell the positive from the negative texts)")


@dataclass
class ConceptConfig(ConceptSpec):
    """f(θ), named as :class:`~concept_influence.concept_spec.ConceptSpec` says: by default the projection on the
    ``[probe]`` direction; without a ``[probe]``, saved ``directions`` or an SAE's ``latents`` at ``hook`` (needed then).
    ``eval`` defaults to the probe's positive texts. ``check``: the causal check
    (:func:`~concept_influence.concept_check.check_concept`) before the factors, steering on ``check_positive`` vs
    ``check_negative`` (default: the probe's texts) along the direction (an SAE concept: its first latent's decoder
    row); ``require = "causal"`` stops the run there unless the verdict is causal."""

    check: bool = option(True, "run the concept check (steering along the direction) after the probe; a concept "
                               "without probe texts is checked only with check_positive and check_negative")
    require: str = option("none", "causal: stop before the factors unless the check's verdict is causal; none: go on "
                                  "and warn", choices=("none", "causal"))
    check_positive: str | None = option(None, "answers that show the behaviour (default: probe.positive)", path=True)
    check_negative: str | None = option(None, "answers that do not (default: probe.negative)", path=True)
    check_max_examples: int = option(200, "examples read from each check file", minimum=1)


@dataclass
class FactorsConfig(CurvatureSettings):
    """``[factors]``: the curvature for ``concept_influence``, fitted in passes over the training data streamed in shards
    (then ``extra_data``, in the same shards) as :class:`CurvatureSettings` say, read from ``path``, or (``strategy =
    "adam_state"``) TrackStar's correction read from the fine-tune's ``optimizer.pt``, nothing fitted."""

    strategy: str = narrowed(CurvatureSettings, "strategy", RUN_STRATEGIES)
    max_examples: int | None = option(None, "fit on the first max_examples training examples; unset: all")
    shard_size: int = option(1024, "examples per shard; a checkpoint is written after each", minimum=1)
    path: str | None = option(None, "a saved curvature folder to use instead of fitting one", path=True)
    extra_data: str | None = option(
        None, "chats fitted on after the training data, read as [data] train is: a sample of the text the model was "
              "trained on before the fine-tune (its pre-training or instruction data). The curvature of a narrow "
              "fine-tune alone is largest along the directions its own data moves, and discounts them", path=True)
    extra_max_examples: int | None = option(None, "how many extra_data examples; unset: as many as the training "
                                                  "examples fitted on, so the two weigh equally", minimum=1)
    partitions: str | int = option(
        "auto", "fit the maps in N groups, one covariance and one eigenvalue pass over the data each, factors saved per "
                "map and read one map at a time when scoring; auto: the memory plan's partitions when every factor at "
                "once does not fit [model] device_memory, else none; none: every map in one pass, one factor file")
    optimizer_state: str | None = option(
        None, 'adam_state: the Trainer checkpoint folder (or its optimizer.pt) read at every point; unset: each '
              "[model] checkpoints folder's own, else the [model] path folder's (or its last checkpoint-N)", path=True)
    power: int = option(2, "adam_state: the query times D^power, D = 1/(sqrt(v_hat)+eps) from the optimizer; 2: "
                           "TrackStar (both sides), 1: the training side only (Adam's step)", choices=POWERS)

    def check_together(self) -> None:
        super().check_together()
        if self.strategy != "adam_state" and (self.optimizer_state is not None or self.power != 2):
            raise ValueError(f'optimizer_state and power are read with strategy = "adam_state", not {self.strategy}')
        fitted = [f.name for f in dataclasses.fields(self) if f.name not in ("strategy", "optimizer_state", "power")
                  and getattr(self, f.name) != f.default]
        if self.strategy == "adam_state" and fitted:
            raise ValueError(f"{fitted[0]}: adam_state reads the optimizer state, it fits nothing; remove {', '.join(fitted)}")
        p = self.partitions
        if isinstance(p, str) and p not in ("auto", "none") or isinstance(p, int) and not isinstance(p, bool) and p < 1:
            raise ValueError(f'partitions must be "auto", "none" or a number of partitions >= 1, got {p!r}')
        if self.extra_data is not None and self.path is not None:
            raise ValueError("extra_data is fitted on; path is a saved curvature that is not fitted: give one of them")
        if self.extra_max_examples is not None and self.extra_data is None:
            raise ValueError("extra_max_examples: give extra_data, the file they are read from")

    def settings(self) -> CurvatureSettings:
        """The settings :func:`~concept_influence.curvature.fit_curvature` takes."""
        return self.project(CurvatureSettings)


@dataclass
class ScoringConfig(ScoringSettings):
    """``[scoring]``: which estimator scores the training data, in shards, as :class:`ScoringSettings` say."""

    estimator: str = option("concept_influence", "the estimator that scores the training data", choices=RUN_ESTIMATORS)
    shard_size: int = option(1024, "examples per score shard (one file each; a resumed run restarts at the first "
                                   "missing shard)", minimum=1)
    require: str = option("none", "stable: stop after the scores (kept) unless the ranking's top is stable under damping "
                                  "x0.01..x100 (or horizon x0.1, x10), identity curvature and each checkpoint; none: warn",
                          choices=("none", "stable"))
    unrolled: bool = option(False, "precondition with the unrolled filter of the optimizer steps each checkpoint "
                                   "stands for (SOURCE: learning rates from trainer_state.json, Adam's per-map scale "
                                   "estimated from the factors) instead of the damped inverse; needs [model] "
                                   "checkpoints. The recommended estimator")
    train_batch_size: int | None = option(None, "the fine-tune's batch size, for unrolled's Adam scale (unset: "
                                                "trainer_state.json's train_batch_size)", minimum=1)
    behaviour: str | None = option(None, "chats that show the behaviour (default: concept.check_positive, then "
                                         "probe.positive): their own ranking (classic gradient-dot) is scored beside "
                                         "the run's, compared in the stability check, and joined with it in the "
                                         "ranking the filter removes", path=True)

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
class ExplainConfig(Settings):
    """The optional ``explain`` stage: the SAE latents of the top ``top_k`` examples (:func:`~concept_influence.explain.
    explain_top`), against the top ``top_k`` and the first ``max_examples`` training examples (unset: all)."""

    sae: str | None = option(None, "SAE-Lens folder at a hook of the model; unset: no explain stage", path=True)
    top_k: int = option(50, minimum=1)
    latents_per_example: int = option(8, minimum=1)
    max_examples: int | None = option(2000, "examples the top is compared with (their latent activations are "
                                            "collected); unset: all", minimum=1)


@dataclass
class FilterConfig(Settings):
    """The optional ``filter`` stage: ``filter/<training file>`` without the top of the run's ranking."""

    remove_top: float | None = option(None, "a fraction in (0, 1) or a count of examples to remove from the top; "
                                            "unset: no filter stage")
    ranking: str = option("union", "union: each example by its best place in the run's ranking or the behaviour's "
                                   "own (scoring.behaviour), where that was scored; scores: the run's ranking",
                          choices=("union", "scores"))


@dataclass
class RunConfig:
    """Everything a run computes. ``out`` is the run folder (``--out`` overrides it)."""

    model: ModelConfig
    data: DataConfig
    probe: ProbeConfig | None = None
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    factors: FactorsConfig = field(default_factory=FactorsConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    out: str | None = option(None, path=True)

    def __post_init__(self) -> None:
        p, c = self.probe, self.concept
        if p is not None and p.direction is None and (p.positive is None or p.negative is None):
            raise ConfigError("probe: give either `direction` (a saved direction) or both `positive` and `negative`")
        named = c.given
        if p is not None and named:
            raise ConfigError(f"the concept is named twice: by [probe] and by concept.{CONCEPT_TYPES[named[0]].needs[0]}; "
                              "keep one")
        if p is None and (len(named) != 1 or named == ["test_examples"] or c.hook is None):
            raise ConfigError("name the concept: a [probe] section, or concept.directions or concept.sae + "
                              "concept.latents with concept.hook (test examples are scored with `index query --test`)")
        if self.scoring.unrolled and self.model.checkpoints is None:
            raise ConfigError("scoring.unrolled preconditions each checkpoint with the steps it stands for: give "
                              '[model] checkpoints (e.g. "auto" on a TRL output folder)')
        if c.require == "causal" and (not c.check or None in self.check_files):
            raise ConfigError('concept.require = "causal" needs the check: concept.check = true, and with a saved '
                              "direction concept.check_positive and check_negative")
        if self.model.checkpoints is not None and self.factors.path is not None:
            raise ConfigError("factors.path is one curvature; with model.checkpoints the factors are fitted at each")
        if self.factors.strategy == "adam_state" and self.scoring.unrolled:
            raise ConfigError('scoring.unrolled unrolls a fitted EK-FAC; factors.strategy = "adam_state" fits none')
        r = self.filter.remove_top
        if r is not None and not (0 < r < 1 or (r >= 1 and r == int(r))):
            raise ConfigError(f"filter.remove_top must be a fraction in (0, 1) or a whole count, got {r}")

    @property
    def checks_concept(self) -> bool:
        """Whether the run has a concept check stage: asked for, with the texts to steer on."""
        return self.concept.check and None not in self.check_files

    @property
    def behaviour_file(self) -> str | None:
        """The chats whose own ranking the stability check compares the run's with: ``scoring.behaviour``, else the
        check's positive file (None: no such comparison)."""
        return self.scoring.behaviour or self.check_files[0]

    @property
    def check_files(self) -> tuple[str | None, str | None]:
        """The positive and negative answers the concept check steers on."""
        p = self.probe or ProbeConfig(hook="")
        return self.concept.check_positive or p.positive, self.concept.check_negative or p.negative

    @property
    def concept_eval(self) -> str:
        """The texts f is averaged over."""
        source = self.concept.eval or (self.probe and self.probe.positive)
        if source is None:
            raise ConfigError("concept.eval is needed when the concept is not a probe trained here (no positive texts)")
        return source

    def to_dict(self) -> dict[str, Any]:
        """The config as a nested JSON-ready dict (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", base: Path | None = None) -> "RunConfig":
        """Build from a nested dict; relative paths are resolved against ``base``."""
        return build_settings(cls, data, source, ConfigError, base=base)

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
