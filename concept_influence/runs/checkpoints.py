"""Where a run folder computes factors and scores: at the run's model alone, or at each checkpoint of
``[model] checkpoints`` (TracIn-CP with EK-FAC per checkpoint, :class:`~concept_influence.estimators.OverCheckpoints`),
each in its own folder ``checkpoints/<NN-name>/`` with the same layout as the run's root.

``checkpoints`` is a list of what :func:`~concept_influence.models.load_checkpoint` reads (checkpoint folders such as
TRL's ``checkpoint-N/``, model folders, safetensors files) and ``"base"``; or ``"auto"``: ``[model] path`` is a TRL
output folder, and the checkpoints are the base and every ``checkpoint-N/`` in it in step order. ``"base"`` is the
model before fine-tuning: for a PEFT adapter, the adapter with every ``lora_B`` set to zero (the base model's
function, with the same tracked LoRA factors); otherwise the ``[model] base`` folder. ``weights = "lr"`` reads each
checkpoint's learning rate from ``trainer_state.json`` (the log entry nearest its step; the base is step 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelConfig
from ..curvature import CurvatureError, Horizon, learning_rates_from_trainer_state, segment_horizons
from ..models import ModelAdapter, load_checkpoint
from .folder import Layout, RunError, read_json

__all__ = ["Point", "run_points", "point_horizons", "load_point", "describe_points", "model_folder", "BASE"]

BASE = "base"
_STEP = re.compile(r"checkpoint-(\d+)$")


@dataclass(frozen=True)
class Point(Layout):
    """A place where the run fits factors and scores: the run's model itself (``name`` None, files at the run's root)
    or one checkpoint (``source``: its path or ``"base"``; ``weight``: its multiplier in the sum)."""

    root: Path
    name: str | None = None
    source: str | None = None
    step: int | None = None
    weight: float = 1.0

    def stage(self, stage: str) -> str:
        """The name under which ``run.json`` records ``stage`` at this point."""
        return stage if self.name is None else f"{stage}[{self.name}]"


def _step(source: str) -> int | None:
    if source == BASE:
        return 0
    found = _STEP.search(Path(source).name)
    return int(found.group(1)) if found else None


def _trl_checkpoints(folder: Path) -> list[str]:
    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and _STEP.search(p.name)),
                   key=lambda p: int(_STEP.search(p.name).group(1)))
    if not found:
        raise RunError(f"{folder}: model.checkpoints = \"auto\" needs a TRL output folder with checkpoint-N folders; "
                       "none found")
    return [str(p) for p in found]


def model_folder(model: ModelConfig) -> Path:
    """The folder the run's model is loaded from: ``path``, or for ``checkpoints = "auto"`` on a TRL output folder
    that holds no saved model itself, its last ``checkpoint-N``."""
    path = Path(model.path)
    if model.checkpoints == "auto" and path.is_dir() and not any(
            (path / f).is_file() for f in ("adapter_config.json", "config.json", "tl_config.json")):
        return Path(_trl_checkpoints(path)[-1])
    return path


def _trainer_state(model: ModelConfig, sources: list[str], why: str) -> tuple[Path, dict]:
    """The ``trainer_state.json`` of the last checkpoint (else of ``[model] path``) and its contents; every checkpoint
    needs its step from its folder name (``checkpoint-N``)."""
    missing = [s for s in sources if _step(s) is None]
    if missing:
        raise RunError(f"{missing[0]}: {why} needs each checkpoint's step from its folder name (checkpoint-N, as TRL "
                       "writes)")
    last = max((s for s in sources if s != BASE), key=_step, default=model.path)
    candidates = [Path(last) / "trainer_state.json", Path(model.path) / "trainer_state.json"]
    state = next((p for p in candidates if p.is_file()), None)
    if state is None:
        raise RunError(f"{why} reads trainer_state.json; none in {candidates[0].parent} or {model.path}")
    return state, read_json(state)


def _learning_rates(model: ModelConfig, sources: list[str]) -> list[float]:
    """The learning rate logged nearest each checkpoint's step, from the ``trainer_state.json`` of the last
    checkpoint (else of ``[model] path``)."""
    state, info = _trainer_state(model, sources, 'model.weights = "lr" (else give the weights as numbers)')
    logged = [(int(e["step"]), float(e["learning_rate"])) for e in info.get("log_history", [])
              if isinstance(e, dict) and "learning_rate" in e and "step" in e]
    if not logged:
        raise RunError(f"{state}: no learning rate in its log_history (TrainingArguments(logging_steps=...) logs one)")
    return [min(logged, key=lambda entry: (abs(entry[0] - n), entry[0]))[1] for n in map(_step, sources)]


def point_horizons(points: list[Point], model: ModelConfig) -> tuple[list[Horizon], int]:
    """The optimizer steps each checkpoint stands for (:func:`~concept_influence.curvature.segment_horizons` of the
    checkpoints' steps and every step's learning rate in ``trainer_state.json``) and the fine-tune's batch size it
    records (``train_batch_size``), for unrolled preconditioning."""
    sources = [p.source for p in points if p.name]  # (the config refuses scoring.unrolled without checkpoints)
    state, info = _trainer_state(model, sources, "scoring.unrolled")
    try:
        return (segment_horizons([_step(s) for s in sources], learning_rates_from_trainer_state(state)),
                int(info.get("train_batch_size") or 0))
    except (CurvatureError, ValueError) as e:
        raise RunError(f"scoring.unrolled: {e}") from None


def run_points(root: Path, model: ModelConfig) -> list[Point]:
    """The points of a run folder at ``root``: the model alone, or one per checkpoint with its weight."""
    if model.checkpoints is None:
        return [Point(root)]
    sources = [BASE, *_trl_checkpoints(Path(model.path))] if model.checkpoints == "auto" else list(model.checkpoints)
    for source in sources:
        if source != BASE and not Path(source).exists():
            raise RunError(f"{source}: no such checkpoint (model.checkpoints)")
    if model.weights == "lr":
        weights = _learning_rates(model, sources)
    elif isinstance(model.weights, list):
        if len(model.weights) != len(sources):
            raise RunError(f"model.weights: {len(model.weights)} weights for {len(sources)} checkpoints "
                           f"({', '.join(map(str, sources))})")
        weights = [float(w) for w in model.weights]
    else:
        weights = [1.0] * len(sources)
    names = [f"{i:02d}-{BASE if s == BASE else Path(s).name}" for i, s in enumerate(sources)]
    return [Point(root / "checkpoints" / name, name, source, _step(source), w)
            for name, source, w in zip(names, sources, weights)]


def load_point(adapter: ModelAdapter, point: Point, model: ModelConfig, own: Mapping[str, torch.Tensor]) -> None:
    """Load ``point``'s weights into ``adapter`` (whose own checkpointed weights are ``own``), in place."""
    if point.source != BASE:
        load_checkpoint(adapter, point.source)
    elif any("lora_" in k for k in own):  # a PEFT model's base: its adapters contribute nothing
        adapter.model.load_state_dict({k: v * 0 if "lora_B" in k else v for k, v in own.items()}, strict=False)
    elif model.base is None:
        raise RunError('model.checkpoints: "base" of a model that is not a PEFT adapter is the model before fine-tuning; '
                       "give its folder as model.base")
    else:
        load_checkpoint(adapter, model.base)


def describe_points(points: list[Point]) -> list[dict]:
    """What ``run.json`` records of the checkpoints."""
    return [{"name": p.name, "source": p.source, "step": p.step, "weight": p.weight} for p in points if p.name]

