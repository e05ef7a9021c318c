"""Comparisons in norm, for results that passed through an eigendecomposition (preconditioned gradients, EK-FAC and
K-FAC scores, eigenbases, index projections).

Two fits of the same curvature that sum in a different order (other batch sizes, shards, processes, BLAS kernels)
agree on the covariances up to rounding, but eigenvectors of nearly equal eigenvalues rotate within their near-degenerate
subspace: a few elements of a preconditioned result can then move by percents while the result as a whole moves by
little. Element-wise tolerances (``torch.testing.assert_close``, ``np.allclose``) fail on such elements; a tolerance on
the norm of the difference, relative to the norm of the expected result, states what is meant: the two results are
the same vector up to a small relative error. Compare the covariances before the eigendecomposition element by element
where they are at hand (they agree up to rounding)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["relative_error", "assert_close_in_norm"]


def _float64(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach().to("cpu", torch.float64)


def relative_error(actual, expected, dim=None) -> torch.Tensor:
    """``‖actual − expected‖₂ / ‖expected‖₂`` (float64): over all elements (Frobenius) when ``dim`` is None, else
    over ``dim`` (an int or a tuple of ints), one error per remaining index. A zero ``expected`` gives 0 when
    ``actual`` is zero too, else infinity."""
    a, e = _float64(actual), _float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs expected {tuple(e.shape)}")
    diff = torch.linalg.vector_norm(a - e, dim=dim)
    ref = torch.linalg.vector_norm(e, dim=dim)
    return torch.where(diff == 0, torch.zeros_like(diff), diff / ref)


def assert_close_in_norm(actual, expected, rtol: float, dim=None, msg: str = "") -> None:
    """Assert ``‖actual − expected‖₂ ≤ rtol · ‖expected‖₂`` (see :func:`relative_error` for ``dim``); torch tensors
    or arrays of any shape, compared in float64. Both must be finite and of one shape, and ``expected`` nonzero
    wherever the norm is taken (a comparison against zero is asserted as such, with ``==``)."""
    a, e = _float64(actual), _float64(expected)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        raise AssertionError(f"{msg + ': ' if msg else ''}non-finite values (actual {int((~torch.isfinite(a)).sum())}, "
                             f"expected {int((~torch.isfinite(e)).sum())})")
    ref = torch.linalg.vector_norm(e, dim=dim) if a.shape == e.shape else None
    if ref is not None and not (ref > 0).all():
        raise AssertionError(f"{msg + ': ' if msg else ''}the expected result is zero: compare it with == instead")
    err = relative_error(a, e, dim)
    if not (err <= rtol).all():
        worst = int(err.argmax()) if err.dim() else None
        where = "" if worst is None else f" (worst at index {tuple(map(int, np.unravel_index(worst, tuple(err.shape))))})"
        raise AssertionError(f"{msg + ': ' if msg else ''}relative error in norm {float(err.max()):.3g} > {rtol:g}{where}")
