"""Unrolled preconditioning (SOURCE, Bae et al. 2024): the closed form of training's own steps instead of a damped
inverse.

In the EK-FAC eigenbasis of a map, with corrected eigenvalue σ of one direction, ``T`` SGD steps at learning rates
``η_1 … η_T`` from a point move that direction of the parameters by

    r(σ) = (1 − Π_t (1 − η_t σ)) / σ   (discrete, exact for a quadratic loss)
         ≈ (1 − exp(−σ Σ_t η_t)) / σ  (continuous, the default)

times the gradient of an up-weighted example (its gradient held fixed over the segment). The influence function's
``1/(σ + λ)`` is the limit of many steps; the unrolled filter bounds the low-curvature directions, where the inverse
explodes and EK-FAC is least accurate, by the horizon ``Σ_t η_t``: a damping taken from the fine-tune's schedule
instead of a guess. Because each part's scores are bounded by its own horizon, parts of a checkpoint sum are weighted
by the steps they stand for and no part can dominate by its magnitude alone.

Adam's steps are ``η / sqrt(v̂)`` per parameter; a map's steps are scaled by ``step_scales[name]`` (1 for SGD; for
Adam :func:`adam_step_scales` reads the optimizer's second moments, :func:`fisher_step_scales` estimates them from
the factors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .base import CurvatureError
from .core import KroneckerEigen
from .eigenbasis import EigenbasisCurvature

__all__ = ["Horizon", "UnrolledCurvature", "FORMS", "segment_horizons", "learning_rates_from_trainer_state",
           "adam_step_scales", "fisher_step_scales"]

FORMS = ("continuous", "discrete")


@dataclass(frozen=True)
class Horizon:
    """The learning rates of the optimizer steps one curvature stands for (one per step, in order)."""

    learning_rates: tuple[float, ...]

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.learning_rates)
        if not rates or any(not r >= 0 for r in rates):
            raise ValueError(f"a horizon needs at least one step and non-negative learning rates, got {self.learning_rates!r}")
        object.__setattr__(self, "learning_rates", rates)

    @classmethod
    def constant(cls, learning_rate: float, steps: int) -> "Horizon":
        """``steps`` steps at one learning rate."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return cls((float(learning_rate),) * int(steps))

    @property
    def total(self) -> float:
        """``Σ_t η_t``: the horizon of the continuous form (the influence function's ``1/λ``)."""
        return float(sum(self.learning_rates))

    def scaled(self, factor: float) -> "Horizon":
        """Every step's learning rate times ``factor`` (a map's Adam scale, or a stability variant)."""
        return Horizon(tuple(r * factor for r in self.learning_rates))

    def decay(self, sigma: torch.Tensor, form: str = "continuous") -> torch.Tensor:
        """How much of a direction of curvature ``σ`` survives the steps: ``Π_t (1 − η_t σ)`` or ``exp(−σ Σ η_t)``."""
        if form == "continuous":
            return torch.exp(-sigma * self.total)
        if form != "discrete":
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        out = torch.ones_like(sigma)
        for rate, count in _runs(self.learning_rates):
            out = out * (1 - rate * sigma) ** count
        return out

    def filter(self, sigma: torch.Tensor, form: str = "continuous") -> torch.Tensor:
        """``(1 − decay(σ)) / σ``, and ``Σ η_t`` where ``σ`` is zero (its limit)."""
        if form == "continuous":
            x = sigma * self.total
            small = x.abs() < 1e-6
            value = -torch.expm1(-x) / torch.where(small, torch.ones_like(sigma), sigma)
            return torch.where(small, self.total * (1 - x / 2), value)
        small = sigma.abs() * max(self.learning_rates) * len(self.learning_rates) < 1e-6
        value = (1 - self.decay(sigma, form)) / torch.where(small, torch.ones_like(sigma), sigma)
        return torch.where(small, torch.full_like(sigma, self.total), value)


def _runs(values: Sequence[float]) -> Iterable[tuple[float, int]]:
    """Consecutive equal values as ``(value, count)``, so a constant schedule is one power."""
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            yield values[start], i - start
            start = i


def segment_horizons(checkpoint_steps: Sequence[int], learning_rates: Sequence[float]) -> list[Horizon]:
    """The steps each checkpoint stands for, by the trapezoid rule: checkpoint ``i`` (at optimizer step
    ``checkpoint_steps[i]``, the base at 0) takes the second half of the steps since the checkpoint before it and
    the first half of those up to the next; the first and last take all of the steps before the first and after the
    last checkpoint. ``learning_rates[t]`` is the learning rate of step ``t + 1``. Every step is counted once."""
    steps = [int(s) for s in checkpoint_steps]
    if not steps or steps != sorted(steps) or len(set(steps)) != len(steps) or steps[0] < 0:
        raise ValueError(f"checkpoint steps must be distinct, non-negative and increasing, got {list(checkpoint_steps)}")
    n = len(learning_rates)
    if steps[-1] > n:
        raise ValueError(f"a checkpoint at step {steps[-1]} but only {n} learning rates")
    bounds = [0] + [(a + b) // 2 for a, b in zip(steps, steps[1:])] + [n]
    horizons = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        rates = tuple(learning_rates[lo:hi])
        if not rates:
            raise ValueError(f"checkpoint {i} (step {steps[i]}) stands for no step; drop it or give more steps")
        horizons.append(Horizon(rates))
    return horizons


def learning_rates_from_trainer_state(path: str | Path, n_steps: int | None = None) -> list[float]:
    """Every optimizer step's learning rate (step 1 first) from a TRL / Hugging Face ``trainer_state.json``: its
    ``log_history`` logs one every ``logging_steps``; a step takes the rate logged at it or, between logs, at the next
    logged step (the last logged rate after the last log). ``n_steps`` defaults to ``global_step``."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CurvatureError(f"{path}: cannot read a trainer_state.json ({e})") from None
    logged = sorted((int(e["step"]), float(e["learning_rate"])) for e in state.get("log_history", [])
                    if isinstance(e, dict) and "learning_rate" in e and "step" in e)
    if not logged:
        raise CurvatureError(f"{path}: no learning rate in its log_history (TrainingArguments(logging_steps=...) logs one)")
    n = int(n_steps if n_steps is not None else state.get("global_step", logged[-1][0]))
    rates, i = [], 0
    for step in range(1, n + 1):
        while i < len(logged) - 1 and logged[i][0] < step:
            i += 1
        rates.append(logged[i][1])
    return rates


def adam_step_scales(optimizer: torch.optim.Optimizer, maps, eps: float | None = None) -> dict[str, float]:
    """``1 / sqrt(mean v̂)`` per map from an Adam(W) optimizer's bias-corrected second moments of the map's weight:
    Adam's step ``η m̂ / (sqrt(v̂) + ε)`` as a scalar multiple of ``η`` per map. A map without state gets 1."""
    scales = {}
    for m in maps:
        state = optimizer.state.get(m.weight, {})
        if "exp_avg_sq" not in state:
            scales[m.name] = 1.0
            continue
        group = next(g for g in optimizer.param_groups if any(p is m.weight for p in g["params"]))
        beta2 = group["betas"][1]
        step = float(state["step"])
        v_hat = state["exp_avg_sq"].double().mean() / (1 - beta2 ** step)
        scales[m.name] = float(1 / (v_hat.sqrt() + (group["eps"] if eps is None else eps)))
    return scales


def fisher_step_scales(curvature: EigenbasisCurvature, batch_size: int) -> dict[str, float]:
    """Adam's per-map scale estimated without its state: a mini-batch gradient's mean square per parameter is about
    the mean per-example one divided by the batch size, and the mean of the corrected eigenvalues is that per-example
    mean square (a rotation keeps the sum of squares), so ``1 / sqrt(mean Λ / batch_size)``."""
    out = {}
    for name, f in curvature.factors.items():
        mean = float(f.eigenvalues.double().mean())
        out[name] = 1.0 if mean <= 0 else float((mean / batch_size) ** -0.5)
    return out


class UnrolledCurvature(EigenbasisCurvature):
    """EK-FAC factors whose preconditioner is the unrolled filter ``r(σ)`` of a :class:`Horizon` (see the module
    docstring), the horizon scaled per map by ``step_scales`` (default 1: SGD)."""

    strategies = {"unrolled": None}  # built from a fitted curvature (from_curvature), not fitted

    def __init__(self, factors: dict[str, KroneckerEigen], horizon: Horizon, *, step_scales: Mapping[str, float] | None = None,
                 form: str = "continuous", fisher: str | None = "true", fingerprint: str | None = None,
                 n_examples: int = 0) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        super().__init__("unrolled", factors, fisher, fingerprint, n_examples)
        self.horizon, self.form = horizon, form
        self.step_scales = {name: float((step_scales or {}).get(name, 1.0)) for name in factors}

    @classmethod
    def from_curvature(cls, curvature: EigenbasisCurvature, horizon: Horizon, *,
                       step_scales: Mapping[str, float] | None = None, form: str = "continuous") -> "UnrolledCurvature":
        """The factors of a fitted ``curvature`` (EK-FAC, K-FAC) preconditioning with the unrolled filter of
        ``horizon`` instead of a damped inverse."""
        return cls(curvature.factors, horizon, step_scales=step_scales, form=form, fisher=curvature.fisher,
                   fingerprint=curvature.fingerprint, n_examples=curvature.n_examples)

    def with_horizon(self, horizon: Horizon | None = None, *, scale: float = 1.0,
                     step_scales: Mapping[str, float] | None = None) -> "UnrolledCurvature":
        """The same factors with another horizon (or this one times ``scale``) and optionally other step scales."""
        return UnrolledCurvature(self.factors, (horizon or self.horizon).scaled(scale),
                                 step_scales=self.step_scales if step_scales is None else step_scales, form=self.form,
                                 fisher=self.fisher, fingerprint=self.fingerprint, n_examples=self.n_examples)

    def propagate(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Carry a query gradient back through this curvature's steps, ``Q [decay(Λ) ⊙ Qᵀ V Q] Qᵀ``: a change made
        before the steps reaches their end multiplied by the decay (SOURCE's chaining of segments)."""
        return {name: self._apply(name, v, self._horizon(name).decay(self.factors[name].eigenvalues.double(), self.form))
                for name, v in grads.items()}

    def eigen_weights(self, name: str, sigma: torch.Tensor) -> torch.Tensor:
        """The unrolled filter ``r(σ)`` of map ``name``'s horizon (what the index's ``eigen`` projection uses)."""
        return self._horizon(name).filter(sigma.double(), self.form).to(sigma.dtype)

    def _precondition_map(self, name: str, v: torch.Tensor) -> torch.Tensor:
        return self._apply(name, v, self.eigen_weights(name, self.factors[name].eigenvalues.double()))

    def _horizon(self, name: str) -> Horizon:
        return self.horizon.scaled(self.step_scales[name])

    def _apply(self, name: str, v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        f = self.factors[name]
        rotated = f.q_s.T @ v.to(f.q_a) @ f.q_a
        return (f.q_s @ (rotated * weights.to(rotated)) @ f.q_a.T).to(v)

    def _config(self) -> dict:
        return {"learning_rates": list(self.horizon.learning_rates), "step_scales": self.step_scales, "form": self.form}

    @classmethod
    def _restore(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "UnrolledCurvature":
        return cls(cls._restore_factors(config, tensors), Horizon(tuple(config["learning_rates"])),
                   step_scales=config["step_scales"], form=config["form"], fisher=config["fisher"],
                   fingerprint=config["fingerprint"], n_examples=config["n_examples"])
