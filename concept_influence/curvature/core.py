"""Pure-tensor EK-FAC mathematics, with no model in sight.

For one linear map ``W`` (``d_out × d_in``) a batch is described by its input activations ``a``
``[B, T, d_in]``, the gradients ``g`` ``[B, T, d_out]`` of each example's own loss w.r.t. the map's
outputs, and a token mask ``[B, T]`` (True at real tokens). The per-example gradient is
``G_z = Σ_t g_t a_tᵀ``. This module turns such batches into

* Kronecker covariances ``A = mean_tokens a aᵀ`` and ``S = mean_examples Σ_t g gᵀ`` (:func:`covariance_sums`),
* their eigenbases, in float64 (:meth:`KroneckerEigen.from_covariances`),
* the EK-FAC eigenvalue correction ``Λ = mean_z (Q_Sᵀ G_z Q_A)²`` (:func:`rotated_square_sum`),
* the damped inverse ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` (:meth:`KroneckerEigen.precondition`).

Statistics are kept as sums with counts (:class:`SumStats`) so that shards of data merge by addition. ``a`` and
``g`` may come in a model's bfloat16 or float16: every product and sum here is taken in float32 (or in their dtype
when it is wider).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["SumStats", "KroneckerEigen", "covariance_sums", "rotated_square_sum"]


class SumStats:
    """Named tensor sums, each with a count (tokens or examples); ``mean(key)`` is sum / count.

    Only sums are stored, so statistics of disjoint shards merge by addition (:meth:`merge`), and a
    ``torch.distributed.all_reduce(SUM)`` of every tensor in :meth:`state_dict` merges ranks.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor, count: int, fresh: bool = False) -> None:
        """Add ``value`` to the sum ``key`` and ``count`` to its count. ``fresh``: ``value`` is a new tensor no one
        else holds (a batch's sum), kept as the first sum without a copy (one matrix less at the peak of a pass)."""
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.detach() if fresh else value.detach().clone()
        self.counts[key] = self.counts.get(key, 0) + int(count)

    def mean(self, key: str) -> torch.Tensor:
        """The sum ``key`` divided by its count."""
        if self.counts.get(key, 0) <= 0:
            raise ValueError(f"no statistics accumulated for {key!r}")
        return self.sums[key] / self.counts[key]

    def merge(self, other: "SumStats") -> "SumStats":
        """Add another shard's sums and counts into this one (in place); returns self."""
        for key, value in other.sums.items():
            self.add(key, value, other.counts[key])
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Sums as ``sum/<key>`` and counts as int64 scalars ``count/<key>`` (on the sum's device)."""
        out = {f"sum/{k}": v for k, v in self.sums.items()}
        out.update({f"count/{k}": torch.tensor(self.counts[k], dtype=torch.int64, device=v.device) for k, v in self.sums.items()})
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "SumStats":
        """Inverse of :meth:`state_dict`."""
        stats = cls()
        for name, value in state.items():
            if name.startswith("sum/"):
                key = name[len("sum/"):]
                stats.sums[key] = value.clone()
                stats.counts[key] = int(state[f"count/{key}"])
        return stats


def covariance_sums(a: torch.Tensor, g: torch.Tensor, token_mask: torch.Tensor, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ a aᵀ`` ``[d_in, d_in]`` and ``Σ g gᵀ`` ``[d_out, d_out]`` over the real tokens of a batch.

    ``a`` ``[B, T, d_in]``, ``g`` ``[B, T, d_out]``, ``token_mask`` ``[B, T]`` bool. Tokens outside the mask
    (padding) are dropped; their ``g`` is zero anyway, their ``a`` is not. The products are taken in at least float32
    (float64 when ``dtype`` is), and the sums returned in ``dtype`` (default: that product dtype)."""
    a_real, g_real = _upcast(a[token_mask], dtype), _upcast(g[token_mask], dtype)
    a_sum, s_sum = a_real.T @ a_real, g_real.T @ g_real
    return (a_sum, s_sum) if dtype is None else (a_sum.to(dtype), s_sum.to(dtype))


def _upcast(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` in float32 when its dtype is narrower (a bfloat16 or float16 model's activations and gradients), in
    ``dtype`` when that is wider."""
    return x.to(torch.promote_types(torch.promote_types(x.dtype, torch.float32), dtype or torch.float32))


@dataclass(frozen=True)
class KroneckerEigen:
    """One map's Kronecker eigenbasis ``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ`` and the
    eigenvalues ``Λ`` ``[d_out, d_in]`` of the curvature in the basis ``Q_S ⊗ Q_A``: ``outer(λ_S, λ_A)``
    for K-FAC, the corrected ``E_z[(Q_Sᵀ G_z Q_A)²]`` for EK-FAC."""

    q_a: torch.Tensor
    lambda_a: torch.Tensor
    q_s: torch.Tensor
    lambda_s: torch.Tensor
    eigenvalues: torch.Tensor

    @classmethod
    def from_covariances(cls, a_cov: torch.Tensor, s_cov: torch.Tensor) -> "KroneckerEigen":
        """Eigendecompose ``A`` and ``S`` in float64 (results in the covariances' dtype, at least float32); K-FAC eigenvalues.
        Rounding-negative eigenvalues of these positive semi-definite matrices are clipped to zero."""
        lambda_a, q_a = _eigh(a_cov)
        lambda_s, q_s = _eigh(s_cov)
        return cls.from_eigen(q_a, lambda_a, q_s, lambda_s)

    @classmethod
    def from_eigen(cls, q_a: torch.Tensor, lambda_a: torch.Tensor, q_s: torch.Tensor, lambda_s: torch.Tensor) -> "KroneckerEigen":
        """From eigenvectors (columns) and eigenvalues of ``A`` and ``S``, with K-FAC eigenvalues."""
        return cls(q_a, lambda_a, q_s, lambda_s, torch.outer(lambda_s, lambda_a))

    def with_eigenvalues(self, eigenvalues: torch.Tensor) -> "KroneckerEigen":
        """The same basis with corrected eigenvalues ``Λ`` ``[d_out, d_in]``."""
        if eigenvalues.shape != self.eigenvalues.shape:
            raise ValueError(f"eigenvalues must have shape {tuple(self.eigenvalues.shape)}, got {tuple(eigenvalues.shape)}")
        return replace(self, eigenvalues=eigenvalues)

    def precondition(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` for ``V`` ``[..., d_out, d_in]`` (leading dims broadcast)."""
        rotated = self.q_s.T @ v @ self.q_a
        return self.q_s @ (rotated / (self.eigenvalues + damping)) @ self.q_a.T


def _eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors in at least float32 (covariances kept in bfloat16 give a float32 basis), computed
    in float64. Symmetrised before the float64 copy, which is the only float64 temporary besides the eigenvectors and
    LAPACK's workspace (the plan's :meth:`~concept_influence.plan.MapShape.workspace_bytes`)."""
    dtype = torch.promote_types(cov.dtype, torch.float32)
    wide = cov.to(dtype)
    values, vectors = torch.linalg.eigh(((wide + wide.T) / 2).double())
    return values.clamp_min(0).to(dtype), vectors.to(dtype)


def rotated_square_sum(a: torch.Tensor, g: torch.Tensor, token_mask: torch.Tensor, basis: KroneckerEigen) -> torch.Tensor:
    """``Σ_z (Q_Sᵀ G_z Q_A)²`` ``[d_out, d_in]`` over the examples of a batch, ``G_z = Σ_t g_t a_tᵀ``.

    Tokens are rotated first, ``Q_Sᵀ G_z Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ``; each example's rotated gradient is
    then formed in one reused ``[d_out, d_in]`` buffer and its square added in place (a quarter faster at GPT-2
    size than forming the batch's at once, and no larger than one gradient); in the basis's dtype."""
    dtype = basis.q_a.dtype
    a_rot = a.masked_fill(~token_mask.unsqueeze(-1), 0).to(dtype) @ basis.q_a  # padding: g is zero, a need not be finite
    g_rot = (g.to(dtype) @ basis.q_s).transpose(1, 2)
    total = a_rot.new_zeros(g.shape[-1], a.shape[-1])
    rotated = torch.empty_like(total)
    for g_z, a_z in zip(g_rot, a_rot):
        torch.mm(g_z, a_z, out=rotated)
        total.addcmul_(rotated, rotated)
    return total
