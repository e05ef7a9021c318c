"""Per-map Kronecker projections of per-example gradients, and the curvature in the projected space.

For a linear map ``W`` (``d_out × d_in``) a gradient index stores, for every example z, ``R_z = P_outᵀ G_z P_in``
(``r_out × r_in``), where ``G_z = Σ_t g_t a_tᵀ`` is the example's loss gradient. ``R_z`` is formed from the tokens,
``Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ``, so ``G_z`` never is (LoGra, Choe et al. 2024). The projections
(:data:`PROJECTIONS`, each with what it needs of the curvature, as the methods declare it in
:mod:`concept_influence.curvature.registry`):

* ``eigen`` — the top ``r`` eigenvectors of the map's Kronecker factors S and A (``R_z`` is the leading block of the
  rotated gradient ``Q_Sᵀ G_z Q_A``); any curvature with an eigenbasis, whose weights per eigen-direction give ``C⁻¹``;
* ``random`` — orthonormal bases of random Gaussian subspaces, seeded per map and side (LoGra); a damped inverse;
* ``identity`` — no projection (``R_z = G_z``): exact, and as large as the gradient; any curvature.

A query gradient ``V`` (``∇f`` of a concept, or of a test loss) is scored as influence restricted to the subspace
``W + P_out M P_inᵀ``: ``vec(P_outᵀ V P_in)ᵀ C⁻¹ vec(R_z)`` with ``C = Pᵀ (F + λI) P``, the damped EK-FAC ``F``
restricted to the subspace, computed exactly from the EK-FAC factors (no new pass). For ``eigen`` ``C`` is diagonal
(the block of ``Λ``, plus ``λ``), for ``random`` a dense ``[D, D]`` matrix (``D = r_out·r_in``, Cholesky-factored
once), for ``identity`` the full EK-FAC. When ``P`` is square every projection gives the exact score.
Other curvatures of the query (:data:`QUERY_CURVATURES`): ``identity`` (``C = I``: gradient dot products) and
``empirical`` (``C`` fitted on the stored rows: their damped second moment, as LoGra and Bergson's index do).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import torch

from ..concepts import project_tokens
from ..curvature import Curvature, KroneckerEigen
from ..curvature.registry import StrategyNames
from ..models import LinearMap

__all__ = ["PROJECTIONS", "QUERY_CURVATURES", "MapSpace", "check_projection", "make_spaces", "space_ranks", "spaces_to_tensors",
           "spaces_from_tensors", "cholesky", "damped"]

#: each projection and the capabilities (:class:`Curvature` attributes) it needs of the curvature
PROJECTIONS = {"eigen": ("has_eigenbasis",), "random": ("has_eigenbasis", "has_damping"), "identity": ()}
QUERY_CURVATURES = ("ekfac", "empirical", "identity")


@dataclass(eq=False)
class MapSpace:
    """One map's projected space. ``p_out`` ``[d_out, r_out]`` and ``p_in`` ``[d_in, r_in]`` (None: no projection on
    that side); stored rows hold ``scale · vec(R_z)`` (``scale`` a power of two, so that float16 rows keep their
    precision). The curvature in the space: ``inverse`` ``[r_out, r_in]`` (``eigen``: the curvature's weights of the
    block, ``1 / (Λ_block + λ)`` for EK-FAC) or ``chol`` ``[D, D]`` (``random``: the Cholesky factor of ``C``, float64)."""

    name: str
    shape: tuple[int, int]
    p_out: torch.Tensor | None
    p_in: torch.Tensor | None
    scale: float
    inverse: torch.Tensor | None = None
    chol: torch.Tensor | None = None

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return (self.shape[0] if self.p_out is None else self.p_out.shape[1],
                self.shape[1] if self.p_in is None else self.p_in.shape[1])

    @property
    def dim(self) -> int:
        """``D = r_out · r_in``, the width of this map's block of a stored row."""
        return self.ranks[0] * self.ranks[1]

    def rows(self, a: torch.Tensor, g: torch.Tensor | None, token_mask: torch.Tensor) -> torch.Tensor:
        """``scale · vec(P_outᵀ G_z P_in)`` for each example of a batch, ``[B, D]`` in float32, from its tokens' ``a``
        ``[B, T, d_in]`` and ``g`` ``[B, T, d_out]`` (None: the map gets no gradient; zero rows)."""
        if g is None:
            return a.new_zeros(a.shape[0], self.dim, dtype=torch.float32)
        a = project_tokens(a.masked_fill(~token_mask.unsqueeze(-1), 0), self.p_in)  # padding: a need not be finite
        g = project_tokens(g, self.p_out)
        return (g.transpose(1, 2) @ a).flatten(1) * self.scale

    def reduce(self, grads: torch.Tensor) -> torch.Tensor:
        """``P_outᵀ V P_in`` for gradients ``V`` ``[K, d_out, d_in]``: ``[K, r_out, r_in]``."""
        v = grads
        if self.p_out is not None:
            v = self.p_out.T.to(v) @ v
        if self.p_in is not None:
            v = v @ self.p_in.to(v)
        return v

    @property
    def projection(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P_out, P_in)``, for :func:`~concept_influence.concepts.measurement_gradient` to project a query
        gradient from its tokens."""
        return self.p_out, self.p_in

    def query(self, projected: torch.Tensor, curvature: str, full: Curvature | None = None,
              empirical: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors ``q`` ``[K, D]`` whose dot product with a stored row is ``vᵀ C⁻¹ r`` for each projected query
        gradient ``P_outᵀ V P_in`` ``[K, r_out, r_in]`` (:meth:`reduce`, or formed from the tokens): ``C`` is the
        EK-FAC in the space (``curvature="ekfac"``; the ``identity`` projection needs the ``full`` curvature), the
        Cholesky factor ``empirical`` of the damped second moment of the rows (``"empirical"``), or the identity
        (``"identity"``). The row scale is divided out."""
        v = projected.float()
        if curvature == "ekfac" and self.p_out is None and self.p_in is None:
            v = full.precondition({self.name: v})[self.name]
        v = v.flatten(1)
        if curvature == "ekfac" and self.inverse is not None:
            v = v * self.inverse.flatten().to(v)
        elif curvature == "ekfac" and self.chol is not None:
            v = torch.cholesky_solve(v.double().T, self.chol).T.float()
        elif curvature == "empirical":
            v = torch.cholesky_solve(v.double().T, empirical).T.float()
        return v / self.scale


def cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """The lower Cholesky factor of a symmetric positive-definite matrix (float64); ``ValueError`` naming ``what``."""
    factor, info = torch.linalg.cholesky_ex((matrix.double() + matrix.double().T) / 2)
    if int(info):
        raise ValueError(f"{what}: the damped curvature is not positive definite (leading minor {int(info)})")
    return factor


def damped(second_moment: torch.Tensor, damping_factor: float) -> torch.Tensor:
    """``M + damping_factor · mean(eig(M)) · I`` (the mean eigenvalue is the trace over the size), float64."""
    m = second_moment.double()
    return m + damping_factor * float(m.diagonal().mean()) * torch.eye(m.shape[0], dtype=m.dtype)


def _power_of_two_scale(mean_square: float) -> float:
    """``2^k`` nearest ``1 / sqrt(mean_square)``: rows of this scale are about 1 (1 when ``mean_square`` is not > 0)."""
    if not mean_square > 0:
        return 1.0
    return float(2.0 ** round(-0.5 * torch.log2(torch.tensor(mean_square, dtype=torch.float64)).item()))


def _generator(seed: int, name: str, side: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _random_basis(d: int, r: int, seed: int, name: str, side: str) -> torch.Tensor:
    """An orthonormal basis ``[d, r]`` of a random Gaussian subspace (float64), seeded by ``(seed, map, side)``."""
    gaussian = torch.randn(d, r, generator=_generator(seed, name, side), dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


def _subspace_curvature(f: KroneckerEigen, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """``Pᵀ F P`` ``[D, D]`` (float64) for the EK-FAC ``F = (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` and ``P = P_out ⊗ P_in``:
    entry ``((k,l),(k',l'))`` is ``Σ_ij Λ_ij U_ki U_k'i V_lj V_l'j`` with ``U = P_outᵀ Q_S`` and ``V = P_inᵀ Q_A``."""
    u, v = p_out.T @ f.q_s.double(), p_in.T @ f.q_a.double()
    r_out, r_in = u.shape[0], v.shape[0]
    pairs_in = (v[:, None, :] * v[None, :, :]).reshape(r_in * r_in, -1)  # [(l,l'), d_in]
    pairs_out = (u[:, None, :] * u[None, :, :]).reshape(r_out * r_out, -1)  # [(k,k'), d_out]
    c = pairs_out @ (f.eigenvalues.double() @ pairs_in.T)  # [(k,k'), (l,l')]
    return c.view(r_out, r_out, r_in, r_in).permute(0, 2, 1, 3).reshape(r_out * r_in, r_out * r_in)


def space_ranks(projection: str, rank: int, shape: Sequence[int]) -> tuple[int, int]:
    """``(r_out, r_in)`` of a map of ``shape`` ``(d_out, d_in)``: ``min(rank, d)`` per side, the full size for
    ``identity``."""
    return tuple(d if projection == "identity" else min(rank, d) for d in shape)


def check_projection(projection: str, method: type, strategy: str) -> None:
    """Refuse the curvature method ``method`` (registered as ``strategy``) when it lacks what ``projection`` needs
    (:data:`PROJECTIONS`): a ``ValueError`` naming the methods that have it."""
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; expected one of {', '.join(PROJECTIONS)}")
    needs = PROJECTIONS[projection]
    if not all(getattr(method, need) for need in needs):
        able = StrategyNames(lambda cls, passes: all(getattr(cls, need) for need in needs))
        raise ValueError(f"the {projection} projection needs a curvature method declaring {' and '.join(needs)} "
                         f"({', '.join(able)}); {strategy} does not")


def make_spaces(projection: str, rank: int, maps: Sequence[LinearMap], curvature: Curvature, seed: int = 0) -> list[MapSpace]:
    """Each map's :class:`MapSpace` for ``projection`` (see the module docstring) with ``r = min(rank, d)`` per side,
    from the map's factors in ``curvature``, which must have what :data:`PROJECTIONS` says the projection needs."""
    check_projection(projection, type(curvature), curvature.strategy)
    spaces = []
    for m in maps:
        (d_out, d_in), (r_out, r_in) = m.shape, space_ranks(projection, rank, m.shape)
        if not curvature.has_eigenbasis:
            spaces.append(MapSpace(m.name, (d_out, d_in), None, None, 1.0))
            continue
        f = curvature.factors[m.name]
        if projection == "identity":
            spaces.append(MapSpace(m.name, (d_out, d_in), None, None, _power_of_two_scale(float(f.eigenvalues.mean()))))
        elif projection == "eigen":
            top_out = torch.topk(f.lambda_s, r_out).indices.sort().values
            top_in = torch.topk(f.lambda_a, r_in).indices.sort().values
            block = f.eigenvalues[top_out][:, top_in].float()
            spaces.append(MapSpace(m.name, (d_out, d_in), f.q_s[:, top_out].float().contiguous(),
                                   f.q_a[:, top_in].float().contiguous(), _power_of_two_scale(float(block.mean())),
                                   inverse=curvature.eigen_weights(m.name, block)))
        else:
            p_out = _random_basis(d_out, r_out, seed, m.name, "out")
            p_in = _random_basis(d_in, r_in, seed, m.name, "in")
            c = _subspace_curvature(f, p_out, p_in)
            chol = cholesky(c + curvature.dampings[m.name] * torch.eye(c.shape[0], dtype=c.dtype), f"map {m.name}")
            spaces.append(MapSpace(m.name, (d_out, d_in), p_out.float(), p_in.float(),
                                   _power_of_two_scale(float(c.diagonal().mean())), chol=chol))
    return spaces


def spaces_to_tensors(spaces: Sequence[MapSpace]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The spaces as safetensors tensors and metadata (``spaces``: each map's name, shape and scale, in order)."""
    tensors = {f"{s.name}/{key}": getattr(s, key) for s in spaces for key in ("p_out", "p_in", "inverse", "chol")
               if getattr(s, key) is not None}
    info = [{"name": s.name, "shape": list(s.shape), "scale": s.scale} for s in spaces]
    return tensors, {"spaces": json.dumps(info)}


def spaces_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[MapSpace]:
    """Inverse of :func:`spaces_to_tensors`."""
    return [MapSpace(s["name"], tuple(s["shape"]), *(tensors.get(f"{s['name']}/{k}") for k in ("p_out", "p_in")),
                     s["scale"], *(tensors.get(f"{s['name']}/{k}") for k in ("inverse", "chol")))
            for s in json.loads(metadata["spaces"])]
