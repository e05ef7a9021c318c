"""Fit a curvature by driving a :class:`~concept_influence.models.ModelAdapter` over training examples.

The maps' inputs ``a`` and output gradients ``g`` come from the shared pipeline
:func:`concept_influence.gradients.captured_batches`, with labels sampled from the model (true Fisher)
or taken from the data (empirical Fisher). Pass 1 accumulates the Kronecker
covariances, pass 2 (EK-FAC only) the eigenvalue correction in their eigenbasis; both return
:class:`SumStats` so shards fitted apart (processes, ranks, resumed runs) merge by addition.

During fitting the model is put in eval mode (no dropout: the Fisher of the deterministic model) and the
tracked weights require grad; both are restored afterwards. Parameter ``.grad`` fields are not touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import TokenizedExample
from ..gradients import captured_batches, check_finite
from ..models import LinearMap, MapSelection, ModelAdapter
from ..options import Settings, option
from . import registry
from .base import Curvature, CurvatureError
from .core import KroneckerEigen, SumStats, covariance_sums, rotated_square_sum
from .ekfac import DEFAULT_DAMPING_FACTOR, check_damping

__all__ = ["CurvatureSettings", "Fitting", "fit_curvature", "collect_covariance_stats", "covariance_torch_dtype",
           "collect_eigenvalue_stats", "resolve_maps", "Accumulate"]

#: ``accumulate(pass_name, collect)`` runs ``collect(examples) -> SumStats`` over the data and returns the
#: total. The default calls it once on all examples; a run folder calls it per shard (resumable, and summed
#: over torch.distributed ranks).
Accumulate = Callable[[str, Callable[[Sequence[TokenizedExample]], SumStats]], SumStats]

FISHERS = ("true", "empirical")
COVARIANCE_DTYPES = ("auto", "float32", "float64", "bfloat16")


@dataclass
class CurvatureSettings(Settings):
    """How :func:`fit_curvature` fits a curvature; also the run config's ``[factors]`` keys and the settings
    saved in a run folder's ``factors/settings.json``."""

    strategy: str = option("ekfac", "a registered curvature method (concept_influence.curvature.registry); ekfac: two "
                                    "passes (Kronecker factors, then eigenvalue correction); kfac: one pass; identity: no "
                                    "pass and no damping", choices=registry.FITTED)
    fisher: str = option("true", "true: labels sampled from the model (seeded per example by `seed`); empirical: "
                                 "the data's labels", choices=FISHERS)
    damping: float | None = option(None, "one absolute damping for every map; unset: `damping_factor` x mean "
                                         "eigenvalue of each map")
    damping_factor: float = option(DEFAULT_DAMPING_FACTOR, "relative damping, used when `damping` is unset")
    batch_size: int = option(8, "examples per forward/backward (results do not depend on it, up to rounding)",
                             minimum=1)
    seed: int = option(0, "seed of the labels sampled for the true Fisher")
    covariance_dtype: str = option("auto", "dtype the Kronecker covariances are summed and kept in (each batch's "
                                           "products are taken in float32 or wider); auto: the model's, at least "
                                           "float32; bfloat16 halves their memory, float64 also gives float64 "
                                           "eigenbases and eigenvalues",
                                   choices=COVARIANCE_DTYPES)

    def check_together(self) -> None:
        check_damping(self.damping, self.damping_factor)


def resolve_maps(adapter: ModelAdapter, maps: None | int | MapSelection | dict | str | Sequence[LinearMap]
                 ) -> list[LinearMap]:
    """``None``: every linear map (the adapter's selection); an int: the maps of blocks ``0..maps``; a
    :class:`~concept_influence.models.MapSelection` (or its dict form, a kind such as ``"mlp"`` or a name glob): the
    maps it keeps; a list: those maps."""
    if maps is None:
        resolved = adapter.linear_maps()
    elif isinstance(maps, (MapSelection, dict, str)):
        resolved = adapter.linear_maps(select=maps)
    elif isinstance(maps, int):
        resolved = adapter.linear_maps(maps)
    else:
        resolved = list(maps)
        bad = [m for m in resolved if not isinstance(m, LinearMap)]
        if bad:
            raise TypeError(f"maps must be None, a max block (int) or LinearMap objects; got {type(bad[0]).__name__}")
    if not resolved:
        raise ValueError(f"maps={maps!r} selects no linear map")
    return resolved


def _captured_batches(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    maps: Sequence[LinearMap],
    fisher: str,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool,
) -> Iterator[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Yield ``(token_mask [B, T], {map: (a, g)})`` per batch (``g`` zero for a map without gradient)."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {', '.join(FISHERS)}; got {fisher!r}")
    if not examples:
        raise ValueError("fitting a curvature needs at least one example")
    for batch, captured in captured_batches(adapter, examples, maps, batch_size=batch_size,
                                            label_seed=seed if fisher == "true" else None, error=CurvatureError,
                                            desc=desc, progress=progress):
        out = {}
        for m in maps:
            a, g = captured[m.name]
            g = a.new_zeros(*a.shape[:2], m.shape[0]) if g is None else g
            check_finite(g, batch, f"output gradient of {m.name}", CurvatureError)
            out[m.name] = (a, g)
        yield batch.attention_mask.bool(), out


def covariance_torch_dtype(covariance_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype covariances are kept in for ``[factors] covariance_dtype`` on a model of ``model_dtype``."""
    if covariance_dtype == "auto":
        return torch.promote_types(model_dtype, torch.float32)
    return getattr(torch, covariance_dtype)


def collect_covariance_stats(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    maps: None | int | Sequence[LinearMap] = None,
    fisher: str = "true",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    covariance_dtype: str = "auto",
) -> SumStats:
    """Pass 1: per map, ``<name>/a`` = Σ over real tokens of ``a aᵀ`` (count: tokens) and ``<name>/s`` =
    Σ over examples of ``Σ_t g gᵀ`` (count: examples), kept in ``covariance_dtype``."""
    if covariance_dtype not in COVARIANCE_DTYPES:
        raise ValueError(f"covariance_dtype must be one of {', '.join(COVARIANCE_DTYPES)}; got {covariance_dtype!r}")
    maps, dtype = resolve_maps(adapter, maps), covariance_torch_dtype(covariance_dtype, adapter.dtype)
    stats = SumStats()
    for token_mask, captured in _captured_batches(adapter, examples, maps, fisher, batch_size, seed,
                                                  "curvature: covariances", progress):
        n_tokens, n_examples = int(token_mask.sum()), token_mask.shape[0]
        for name, (a, g) in captured.items():
            a_sum, s_sum = covariance_sums(a, g, token_mask, dtype)
            stats.add(f"{name}/a", a_sum, n_tokens, fresh=True)
            stats.add(f"{name}/s", s_sum, n_examples, fresh=True)
    return stats


def collect_eigenvalue_stats(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    bases: dict[str, KroneckerEigen],
    maps: None | int | Sequence[LinearMap] = None,
    fisher: str = "true",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> SumStats:
    """Pass 2 (EK-FAC): per map, ``<name>`` = Σ over examples of ``(Q_Sᵀ G_z Q_A)²`` (count: examples).
    Use the same ``fisher`` and ``seed`` as pass 1 so the sampled labels are the same."""
    maps = [m for m in resolve_maps(adapter, maps) if m.name in bases]
    stats = SumStats()
    for token_mask, captured in _captured_batches(adapter, examples, maps, fisher, batch_size, seed,
                                                  "curvature: eigenvalues", progress):
        for name, (a, g) in captured.items():
            stats.add(name, rotated_square_sum(a, g, token_mask, bases[name]), token_mask.shape[0], fresh=True)
    return stats


@dataclass
class Fitting:
    """What a method's :meth:`Curvature.fit` fits from: the adapter, its maps and the settings, with the passes over the
    data run on request (through ``accumulate``)."""

    adapter: ModelAdapter
    examples: Sequence[TokenizedExample]
    maps: list[LinearMap]
    settings: CurvatureSettings
    progress: bool
    accumulate: Accumulate

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint, saved with the curvature."""
        return self.adapter.fingerprint()

    def _common(self) -> dict:
        s = self.settings
        return dict(fisher=s.fisher, batch_size=s.batch_size, seed=s.seed, progress=self.progress)

    def kronecker_factors(self) -> tuple[dict[str, KroneckerEigen], int]:
        """Pass ``"covariance"``, then each map's eigendecomposition (K-FAC), one map at a time, its covariances
        dropped once decomposed (so covariances and eigenbases together take the room of the covariances); and the
        number of examples."""
        dtype = self.settings.covariance_dtype
        cov = self.accumulate("covariance", lambda ex: collect_covariance_stats(self.adapter, ex, self.maps,
                                                                                **self._common(), covariance_dtype=dtype))
        n_examples, factors = cov.counts[f"{self.maps[0].name}/s"], {}
        for m in self.maps:
            factors[m.name] = KroneckerEigen.from_covariances(cov.mean(f"{m.name}/a"), cov.mean(f"{m.name}/s"))
            del cov.sums[f"{m.name}/a"], cov.sums[f"{m.name}/s"]
        return factors, n_examples

    def corrected(self, factors: dict[str, KroneckerEigen]) -> dict[str, KroneckerEigen]:
        """Pass ``"eigenvalues"``: ``factors`` with the EK-FAC eigenvalue correction."""
        eig = self.accumulate("eigenvalues", lambda ex: collect_eigenvalue_stats(self.adapter, ex, factors, self.maps,
                                                                                 **self._common()))
        return {name: f.with_eigenvalues(eig.mean(name)) for name, f in factors.items()}


def fit_curvature(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    maps: None | int | Sequence[LinearMap] = None,
    settings: CurvatureSettings | None = None,
    *,
    progress: bool = True,
    accumulate: Accumulate | None = None,
    **changes: Any,
) -> Curvature:
    """Fit a curvature for ``maps`` (None: all; int: blocks ``0..maps``; or a list of LinearMap) as
    ``settings`` say (see :class:`CurvatureSettings`), with ``changes`` to single settings given as keywords
    (``fit_curvature(adapter, examples, strategy="kfac", damping=0.1)``); the strategy's registered class fits it.

    Results do not depend on ``batch_size`` (up to float rounding). ``accumulate`` (see :data:`Accumulate`)
    decides how each pass covers the data; with it, ``examples`` is not read and may be empty.
    """
    s = (settings or CurvatureSettings()).replace(**changes)
    if accumulate is None:
        accumulate = lambda name, collect: collect(examples)  # noqa: E731
    fitting = Fitting(adapter, examples, resolve_maps(adapter, maps), s, progress, accumulate)
    return registry.method(s.strategy).fit(s.strategy, fitting)
