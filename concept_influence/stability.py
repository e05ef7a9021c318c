"""Is the top of a ranking stable? The same scores under other dampings (or horizons), each part of a checkpoint sum
alone, identity curvature, and (where there is one) the ranking of the behaviour's own examples, compared on the
examples either ranking puts on top.

A ranking that flips when the damping moves by a factor of ten, or whose checkpoint parts disagree in sign on its
top examples, depends on a choice nothing in the data fixed: :func:`check_stability` says so in one line
(:meth:`StabilityReport.warning`) instead of letting a confidently wrong ranking through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from scipy.stats import rankdata, spearmanr

__all__ = ["StabilityReport", "check_stability", "union_ranking", "DEFAULT_AGREEMENT", "DEFAULT_REACH"]

#: The agreement every variant must reach (see :class:`StabilityReport`).
DEFAULT_AGREEMENT = 0.7
#: How far down the other ranking a top example may sit and still count as agreed on: its top 20 % (four times the
#: default top of 5 %; a ranking unrelated to the chosen one puts about 20 % of its top there).
DEFAULT_REACH = 0.2


@dataclass
class StabilityReport:
    """Per variant: ``agreement``, both ways, the smaller of the share of the chosen ranking's ``top`` examples that
    the variant puts in its top ``reach`` (a fraction of the examples) and the share of the variant's ``top`` that the
    chosen ranking puts in its top ``reach`` (1: they agree on the top, about ``reach``: unrelated, 0: inverted); and
    its Spearman with the chosen scores over all examples. ``kinds`` says what each variant is (``damping``,
    ``horizon``, ``part``, ``identity``, ``behaviour``). Both ways, because a concept that misses what the behaviour's
    own examples rank on top can still put its own top high in theirs."""

    chosen: str
    top: int
    agreement: dict[str, float]
    spearman: dict[str, float]
    kinds: dict[str, str] = field(default_factory=dict)
    threshold: float = DEFAULT_AGREEMENT
    reach: float = DEFAULT_REACH

    @property
    def disagreeing(self) -> list[str]:
        """The variants below the threshold, worst first."""
        return sorted((v for v, a in self.agreement.items() if a < self.threshold), key=self.agreement.get)

    @property
    def stable(self) -> bool:
        """Every variant agrees on the top (see :attr:`agreement`)."""
        return not self.disagreeing

    def warning(self) -> str | None:
        """One line naming the variants that disagree on the top examples, or None when the top is stable."""
        bad = self.disagreeing
        if not bad:
            return None
        named = ", ".join(f"{v} ({self.kinds.get(v, 'variant')}: {self.agreement[v]:.2f})" for v in bad)
        return (f"warning: the top {self.top} of {self.chosen} is not stable: {len(bad)} of {len(self.agreement)} "
                f"variants agree on fewer than {self.threshold:.0%} of the top (each way, within the top "
                f"{self.reach:.0%}): {named}")

    def format(self) -> str:
        """A markdown table of every variant and the verdict."""
        lines = [f"Stability of the top {self.top} of {self.chosen}: "
                 + ("stable" if self.stable else "NOT stable"), "",
                 "| variant | kind | agreement on the top | Spearman with the chosen |", "|---|---|---|---|"]
        lines += [f"| {v} | {self.kinds.get(v, '')} | {a:.2f} | {self.spearman[v]:.3f} |" for v, a in self.agreement.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "top": self.top, "threshold": self.threshold, "reach": self.reach,
                "stable": self.stable,
                "agreement": self.agreement, "spearman": self.spearman, "kinds": self.kinds, "warning": self.warning()}


def check_stability(chosen: np.ndarray, variants: Mapping[str, np.ndarray], *, name: str = "the ranking",
                    kinds: Mapping[str, str] | None = None, top: int | None = None,
                    threshold: float = DEFAULT_AGREEMENT, reach: float = DEFAULT_REACH) -> StabilityReport:
    """Compare ``chosen`` scores ``[N]`` with each of ``variants`` (``{name: [N]}``) on the ``top`` examples of each
    (default: 5 % of N, at least 10 and at most N/2), counted as agreed within the other's top ``reach`` × N."""
    chosen = np.asarray(chosen, dtype=float)
    n = len(chosen)
    if n < 2:
        raise ValueError(f"a stability check needs at least 2 scored examples, got {n}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not 0 < reach <= 1:
        raise ValueError(f"reach must be in (0, 1], got {reach}")
    top = int(min(max(10, round(0.05 * n)), n // 2) if top is None else top)
    if not 1 <= top <= n:
        raise ValueError(f"top must be between 1 and the {n} examples, got {top}")
    within = max(top, int(np.ceil(reach * n)))
    chosen_top, chosen_rank = _top_and_ranks(chosen, top)
    agreement, rho = {}, {}
    for variant, values in variants.items():
        values = np.asarray(values, dtype=float)
        if values.shape != chosen.shape:
            raise ValueError(f"variant {variant!r} has {values.shape} scores; the chosen ranking has {chosen.shape}")
        variant_top, variant_rank = _top_and_ranks(values, top)
        agreement[variant] = float(min((variant_rank[chosen_top] < within).mean(), (chosen_rank[variant_top] < within).mean()))
        rho[variant] = float(spearmanr(chosen, values)[0]) if np.ptp(values) > 0 else float("nan")
    return StabilityReport(name, top, agreement, rho, dict(kinds or {}), threshold, reach)


def _top_and_ranks(scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the ``top`` highest ``scores`` and every example's rank (0: highest; ties broken by position)."""
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(scores), dtype=int)
    rank[order] = np.arange(len(scores))
    return order[:top], rank


def union_ranking(*rankings: np.ndarray) -> np.ndarray:
    """Scores ``[N]`` that rank each example by its best place in any of ``rankings`` (each ``[N]``, higher first):
    the largest of its rank fractions (1 = top of one of them), ties broken by its smallest. The top of the union holds
    the top of every ranking, so what either one finds is found: the concept's ranking where the behaviour's own
    examples are too narrow, the behaviour's where the concept is not what the data moved."""
    if not rankings:
        raise ValueError("union_ranking needs at least one ranking")
    values = [np.asarray(r, dtype=float) for r in rankings]
    n = len(values[0])
    if any(v.shape != (n,) for v in values):
        raise ValueError(f"every ranking needs one score per example; got shapes {[v.shape for v in values]}")
    fractions = np.stack([rankdata(v) / n for v in values])  # (average ranks for ties: steps of at least 1/(2N))
    return fractions.max(axis=0) + fractions.min(axis=0) / (4 * n)
