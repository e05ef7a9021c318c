"""Curvature approximations for influence: EK-FAC, K-FAC, identity, unrolled (SOURCE) preconditioning, and EK-FAC
refined by conjugate gradient on the fit data's Fisher (:class:`RefinedCurvature`), and TrackStar's element-wise Adam
correction from a fine-tune's optimizer state (:class:`AdamStateCurvature`).

``fit_curvature(adapter, examples, maps, CurvatureSettings(strategy=...))`` returns a :class:`Curvature` whose
``precondition({map name: gradient [..., d_out, d_in]})`` applies ``(G + λI)⁻¹``; ``save``/``load`` use
safetensors + JSON and check the model fingerprint. The pure-tensor mathematics is in :mod:`.core`; the eigenbasis
per map that EK-FAC, K-FAC and unrolled preconditioning keep, and how it is saved, in :mod:`.eigenbasis`. Each method is a
:class:`Curvature` subclass that registers its strategy names and declares what it needs and provides
(:mod:`.registry`); fitting, loading, run configs, the memory plan and the index read those declarations.
:func:`stability_variants` gives the variants of a curvature that the stability check compares it with (:mod:`.variants`).
"""

from .base import Curvature, CurvatureError
from .core import KroneckerEigen, SumStats, covariance_sums, rotated_square_sum
from .ekfac import EKFACCurvature
from .fit import CurvatureSettings, collect_covariance_stats, collect_eigenvalue_stats, fit_curvature, resolve_maps
from .gauss_newton import GaussNewton
from .identity import IdentityCurvature
from .optimizer_state import AdamStateCurvature
from .partitions import fit_partitioned, split_maps
from .refined import RefinedCurvature
from .unrolled import (
    Horizon,
    UnrolledCurvature,
    adam_step_scales,
    fisher_step_scales,
    learning_rates_from_trainer_state,
    segment_horizons,
)
from .variants import DAMPING_VARIANTS, HORIZON_VARIANTS, stability_variants, variant_kinds

__all__ = [
    "Curvature",
    "CurvatureError",
    "CurvatureSettings",
    "EKFACCurvature",
    "IdentityCurvature",
    "AdamStateCurvature",
    "UnrolledCurvature",
    "RefinedCurvature",
    "GaussNewton",
    "Horizon",
    "segment_horizons",
    "learning_rates_from_trainer_state",
    "adam_step_scales",
    "fisher_step_scales",
    "KroneckerEigen",
    "SumStats",
    "covariance_sums",
    "rotated_square_sum",
    "fit_curvature",
    "collect_covariance_stats",
    "collect_eigenvalue_stats",
    "resolve_maps",
    "fit_partitioned",
    "split_maps",
    "stability_variants",
    "variant_kinds",
    "DAMPING_VARIANTS",
    "HORIZON_VARIANTS",
]
