"""Is a concept causal for a behaviour? A check to run before attributing.

A concept direction can separate two kinds of answers (a text classifier) without the model using it to
produce them. Concept Influence ranks the data that moves the concept, which finds the data behind a
behaviour only when moving the concept moves the behaviour. :func:`check_concept` measures both:

- *separation*: AUROC of the projection ⟨v̂, h⟩ (mean over response tokens) for held-out positive vs negative
  examples;
- *steering*: adding α·σ·v̂ at the direction's hook (σ: the projection's standard deviation over those examples),
  at every position or at the prompt positions only, and measuring the behaviour: mean per-token log p of the
  positive answers minus that of the negative answers (for paired sets, the benchmarks' paired log-prob gap).

Large steps damage the model in both directions, so the verdict uses the first-order effect: the symmetric
difference ``(b(+α₀) − b(−α₀)) / 2α₀`` at the smallest step α₀, in nats per σ, with a standard error over examples.
``causal``: at least ``threshold`` and two standard errors above zero; ``reversed``: the same below zero;
``weak`` otherwise. The default threshold (0.01 nats per σ) is calibrated on the benchmarks (README, "Is the
concept causal?").
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from probes import token_mask

from .activations import collect_activations
from .data import TokenizedExample, iter_batches
from .errors import ConceptInfluenceError
from .fileio import atomic_write_text, refuse_same_data
from .models import ModelAdapter

__all__ = ["ConceptCheck", "ConceptCheckError", "check_concept", "check_concept_files", "STEERING_POSITIONS", "DEFAULT_ALPHAS",
           "CAUSAL_THRESHOLD", "SEPARATION_MARGIN"]

STEERING_POSITIONS = ("all", "prompt")
POSITION_TOKENS = {"all": "all_tokens", "prompt": "prompt_mean"}  # the token reduction whose tokens are steered
DEFAULT_ALPHAS = (-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0)
CAUSAL_THRESHOLD = 0.01  # nats per σ of first-order steering effect; see the README for its calibration
SEPARATION_MARGIN = 0.1  # a separation AUROC within this of 0.5 is called no separation


class ConceptCheckError(ConceptInfluenceError, ValueError):
    """The check cannot run as asked (empty example sets, wrong width, bad steps); the message says which."""


@dataclass
class ConceptCheck:
    """What :func:`check_concept` measured. ``behaviour[positions][i]`` is the behaviour with ``alphas[i]`` σ of
    the direction added; ``first_order`` and ``first_order_se`` are in nats per σ; ``verdict`` judges
    the ``all`` positions when they were measured (``verdicts`` holds each)."""

    hook_name: str
    n_positive: int
    n_negative: int
    separation_auroc: float
    projection_sd: float
    alphas: list[float]
    baseline: float
    behaviour: dict[str, list[float]]
    first_order: dict[str, float]
    first_order_se: dict[str, float]
    verdicts: dict[str, str]
    threshold: float
    metadata: dict = field(default_factory=dict)

    @property
    def judged(self) -> str:
        """The positions the verdict is read from: ``all`` when measured, else the first measured."""
        return "all" if "all" in self.verdicts else next(iter(self.verdicts))

    @property
    def verdict(self) -> str:
        return self.verdicts[self.judged]

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    @property
    def separates(self) -> bool:
        """Whether the projection tells the positive from the negative examples: its AUROC is at least
        :data:`SEPARATION_MARGIN` away from chance (0.5), either way round."""
        return abs(self.separation_auroc - 0.5) >= SEPARATION_MARGIN

    def explanation(self) -> str:
        """One sentence a person can act on; what it says of the separation follows its AUROC."""
        fo, se = self.first_order[self.judged], self.first_order_se[self.judged]
        effect = f"steering by 1 sd moves the behaviour by {fo:+.4f} ± {se:.4f} nats"
        auroc = self.separation_auroc
        if not self.separates:
            separation = (f"the direction does not separate the texts (AUROC {auroc:.2f}, chance is 0.5: are the positive "
                          "and negative examples different?)")
        elif auroc < 0.5:
            separation = f"the direction separates the texts the other way round (AUROC {auroc:.2f})"
        else:
            separation = f"the direction separates the texts (AUROC {auroc:.2f})"
        if self.verdict == "causal":
            return (f"causal: {effect}; the concept moves the behaviour, so concept attribution can find its data"
                    + ("." if self.separates else f"; but {separation}."))
        if self.verdict == "reversed":
            return (f"reversed: {effect}; raising the concept lowers the behaviour, so rank by the negated concept "
                    f"or choose another direction; {separation}.")
        return (f"weak: {effect} (threshold {self.threshold}); {separation}"
                + (" but" if self.separates else " and") + " it does not drive the behaviour, so concept scores are not "
                "evidence of which data causes it.")

    def format(self) -> str:
        """A short plain-text report."""
        lines = [f"concept check at {self.hook_name} ({self.n_positive} positive, {self.n_negative} negative examples)",
                 f"separation: AUROC {self.separation_auroc:.3f} of the projection; its sd {self.projection_sd:.4g}",
                 f"behaviour (mean log p positive − negative) without steering: {self.baseline:+.4f}",
                 f"{'alpha (sd)':>10}  " + "  ".join(f"{p + ' positions':>16}" for p in self.behaviour)]
        for i, a in enumerate(self.alphas):
            lines.append(f"{a:>10.2f}  " + "  ".join(f"{v[i] - self.baseline:>+16.4f}" for v in self.behaviour.values()))
        for p in self.behaviour:
            lines.append(f"first-order effect ({p} positions): {self.first_order[p]:+.4f} ± "
                         f"{self.first_order_se[p]:.4f} nats per sd -> {self.verdicts[p]}")
        lines.append(self.explanation())
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Behaviour change against α for each set of positions, with the first-order line."""
        from .plots import save_figure, subplots

        fig, ax = subplots(figsize=(5.5, 3.6))
        xs = [0.0, *self.alphas]
        for p, values in self.behaviour.items():
            order = np.argsort(xs)
            ys = np.array([0.0, *(v - self.baseline for v in values)])
            ax.plot(np.array(xs)[order], ys[order], marker="o", label=f"steer at {p} positions")
            ax.plot([-1, 1], [-self.first_order[p], self.first_order[p]], ls="--", lw=1, color=ax.lines[-1].get_color())
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("α (standard deviations of the projection)")
        ax.set_ylabel("Δ log p(positive) − log p(negative) (nats)")
        ax.set_title(f"{self.hook_name}: {self.verdict}")
        ax.legend(fontsize=8)
        return save_figure(fig, path)


def _check_inputs(adapter: ModelAdapter, direction, positive, negative, alphas, positions) -> None:
    if not positive or not negative:
        raise ConceptCheckError(f"the check needs positive and negative examples, got {len(positive)} positive and "
                                f"{len(negative)} negative")
    width = adapter.hook_width(direction.hook_name)
    if direction.vector.numel() != width:
        raise ConceptCheckError(f"the direction has {direction.vector.numel()} dimensions, but {direction.hook_name} "
                                f"has width {width}")
    bad = [p for p in positions if p not in STEERING_POSITIONS]
    if bad:
        raise ConceptCheckError(f"unknown steering positions {bad[0]!r}; expected one of {STEERING_POSITIONS}")
    steps = [float(a) for a in alphas]
    if not any(a > 0 for a in steps) or not any(a < 0 for a in steps):
        raise ConceptCheckError(f"alphas need at least one positive and one negative step, got {steps}")


@torch.no_grad()
def _log_probs(adapter: ModelAdapter, examples, hook: str, shift: torch.Tensor | None, positions: str,
               batch_size: int) -> np.ndarray:
    """Mean per-token log p of each example's response, with ``shift`` added at ``hook`` over the tokens of
    ``positions`` (None: no steering)."""
    out = []
    for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
        batch = batch.to(adapter.device)
        steer = nullcontext()
        if shift is not None:
            where = token_mask(batch, POSITION_TOKENS[positions]).unsqueeze(-1)
            steer = adapter.edit_activation(hook, lambda act: act + where.to(act.dtype) * shift.to(act))
        with steer:
            out.append(-adapter.per_example_loss(batch).double().cpu().numpy())
    return np.concatenate(out)


def _verdict(effect: float, se: float, threshold: float) -> str:
    if effect >= threshold and effect > 2 * se:
        return "causal"
    if effect <= -threshold and -effect > 2 * se:
        return "reversed"
    return "weak"


def check_concept(adapter: ModelAdapter, direction, positive: Sequence[TokenizedExample],
                  negative: Sequence[TokenizedExample], *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                  positions: Sequence[str] = STEERING_POSITIONS, threshold: float = CAUSAL_THRESHOLD,
                  batch_size: int = 16) -> ConceptCheck:
    """Check that ``direction`` (a :class:`probes.ConceptDirection`, e.g. a probe, persona vector or an SAE
    latent's decoder row) separates held-out ``positive`` from ``negative`` examples and that steering along it
    moves the behaviour (log p of positive minus negative answers). See the module docstring for the verdict."""
    positions = list(dict.fromkeys(positions))
    if not positions:
        raise ConceptCheckError(f"no steering positions given; expected some of {STEERING_POSITIONS}")
    _check_inputs(adapter, direction, positive, negative, alphas, positions)
    hook = direction.hook_name
    unit = direction.unit.float()
    pos_proj, neg_proj = ((collect_activations(adapter, x, hook, batch_size=batch_size, progress=False).values @ unit)
                          .numpy() for x in (positive, negative))
    labels = np.r_[np.ones(len(pos_proj)), np.zeros(len(neg_proj))]
    all_proj = np.r_[pos_proj, neg_proj]
    separation = float(roc_auc_score(labels, all_proj))
    sd = float(all_proj.std())
    if not sd > 0:
        raise ConceptCheckError(f"the projection on {hook} is constant over the examples; nothing to steer by")

    def gap(shift, where):
        return (_log_probs(adapter, positive, hook, shift, where, batch_size),
                _log_probs(adapter, negative, hook, shift, where, batch_size))

    base_pos, base_neg = gap(None, "all")
    baseline = float(base_pos.mean() - base_neg.mean())
    steps = sorted(float(a) for a in alphas)
    small = min(abs(a) for a in steps)
    behaviour, first, first_se, verdicts = {}, {}, {}, {}
    for where in positions:
        per_alpha = {a: gap(a * sd * unit, where) for a in set(steps) | {small, -small}}
        behaviour[where] = [float(per_alpha[a][0].mean() - per_alpha[a][1].mean()) for a in steps]
        d_pos = (per_alpha[small][0] - per_alpha[-small][0]) / (2 * small)
        d_neg = (per_alpha[small][1] - per_alpha[-small][1]) / (2 * small)
        first[where] = float(d_pos.mean() - d_neg.mean())
        first_se[where] = float(np.sqrt(d_pos.var(ddof=1) / len(d_pos) + d_neg.var(ddof=1) / len(d_neg))
                                if min(len(d_pos), len(d_neg)) > 1 else float("nan"))
        verdicts[where] = _verdict(first[where], 0.0 if np.isnan(first_se[where]) else first_se[where], threshold)
    return ConceptCheck(hook, len(positive), len(negative), separation, sd, steps, baseline, behaviour, first, first_se,
                        verdicts, threshold, {"direction_kind": getattr(direction, "kind", None)})


def check_concept_files(adapter: ModelAdapter, direction, positive: str, negative: str,
                        read: Callable[[str, str], Sequence[TokenizedExample]], out: str | Path | None = None,
                        keys: tuple[str, str] = ("positive", "negative"), record: dict | None = None,
                        **options) -> ConceptCheck:
    """:func:`check_concept` on the chat files ``positive`` and ``negative`` (tokenised by ``read(path, key)``; ``keys``
    name them in errors), printed, and with ``out`` written to ``out/concept_check.json`` (the numbers, the explanation, the
    files and ``record``) and ``out/concept_check.png``. The same data on both sides is refused before any work."""
    refuse_same_data((keys[0], positive), (keys[1], negative), "the check compares answers that show the behaviour with "
                     "answers that do not", ConceptCheckError)
    check = check_concept(adapter, direction, read(positive, keys[0]), read(negative, keys[1]), **options)
    print(check.format())
    if out is not None:
        out = Path(out)
        summary = {**check.to_dict(), "explanation": check.explanation(), "positive": str(positive),
                   "negative": str(negative), **(record or {})}
        atomic_write_text(out / "concept_check.json", json.dumps(summary, indent=1) + "\n")
        check.plot(out / "concept_check.png")
    return check
