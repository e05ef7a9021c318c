"""The streaming scoring engine shared by every gradient estimator.

For fixed (preconditioned) queries Q_W, the score of an example z at a linear map W is
⟨Q_W, ∇_W L(z)⟩ = Σ_t g_tᵀ Q_W a_t, where a_t and g_t come from one ordinary forward+backward of the
batch (examples in a right-padded batch do not interact). So a batch costs one forward+backward plus
one matrix product per map for all K queries at once. ``a`` and ``g`` come in the model's dtype and are cast to
float32, one map at a time, for the products with the (float32) queries.

Per map, the contraction that costs fewer multiply-adds for the batch's shapes is used (:func:`example_query_scores`):
per token (``x = Q a_t``, then ``g_t·x``; with a rank-r query ``(g_tᵀU_rS_r)(V_rᵀa_t)``), or through each example's
gradient ``Σ_t g_t a_tᵀ`` dotted with the K queries, which wins when K is large. Per-token shares always take
the per-token path. ``query_rank`` replaces each query by its best rank-r approximation (:func:`low_rank_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from .data import TokenizedExample
from .errors import ConceptInfluenceError
from .gradients import captured_batches, check_finite
from .models import LinearMap, ModelAdapter
from .options import Settings, option
from .scores import Scores

__all__ = ["ScoringError", "ScoringSettings", "LowRankQuery", "Query", "low_rank_queries", "stack_queries",
           "score_with_queries", "token_query_scores", "example_query_scores", "gradient_norms"]


@dataclass
class ScoringSettings(Settings):
    """How the gradient estimators score (:func:`score_with_queries`); also the run config's ``[scoring]``
    keys and the settings saved in a run folder's ``scores/settings.json``."""

    batch_size: int = option(8, "examples per forward/backward", minimum=1)
    loss_tokens: str = option("response", "the tokens whose loss L(z) is differentiated: the response, or all "
                                          "tokens (gradient estimators)", choices=("response", "all"))
    per_module: bool = option(False, "also keep each linear map's share of the score (gradient estimators)")
    per_token: bool = option(False, "also keep each example's per-token shares (gradient estimators)")
    normalize: str = option("none", "divide each example's score by the norm of its loss gradient over the tracked "
                                    "maps (unit, as TrackStar and Bergson) or not (none)", choices=("none", "unit"))
    query_rank: int | None = option(None, "replace each tracked map's preconditioned query by its best rank-r "
                                          "approximation (SVD, as kronfluence's query_gradient_low_rank): a token costs "
                                          "r*(d_out+d_in) per query and map instead of d_out*d_in; unset, or r >= "
                                          "min(d_out, d_in): full rank (gradient estimators)", minimum=1)


class ScoringError(ConceptInfluenceError, RuntimeError):
    """Scoring cannot go on (non-finite loss or score); the message names the example ids."""


@dataclass(eq=False)
class LowRankQuery:
    """The K queries of one map as rank-r factors, ``Q_k ≈ left[k] @ right[k]``: ``left`` ``[K, d_out, r]`` is
    ``U_r S_r`` and ``right`` ``[K, r, d_in]`` is ``V_rᵀ`` of the SVD of ``Q_k`` (kronfluence's left/right matrices)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(K, d_out, d_in)``, as the dense query's."""
        return self.left.shape[0], self.left.shape[1], self.right.shape[2]

    @cached_property
    def dense(self) -> torch.Tensor:
        """The rank-r queries as matrices ``[K, d_out, d_in]`` (formed once, when first asked for)."""
        return self.left @ self.right

    def to(self, **kwargs: Any) -> "LowRankQuery":
        """The factors moved as ``torch.Tensor.to`` says; ``self`` (and its formed :attr:`dense`) when nothing moves."""
        left, right = self.left.to(**kwargs), self.right.to(**kwargs)
        return self if left is self.left and right is self.right else LowRankQuery(left, right)


#: One map's K queries: dense ``[K, d_out, d_in]`` or rank-r factors.
Query = Union[torch.Tensor, LowRankQuery]


def low_rank_queries(queries: dict[str, Query], rank: int | None) -> dict[str, Query]:
    """Each map's queries replaced by their best rank-``rank`` approximations (one fp32 SVD per query matrix,
    ``torch.linalg.svd``); a map with ``min(d_out, d_in) <= rank`` keeps its dense, full-rank queries, and so
    does every map when ``rank`` is None. Factors already of rank <= ``rank`` are kept."""
    if rank is None:
        return dict(queries)
    out: dict[str, Query] = {}
    for name, q in queries.items():
        if isinstance(q, LowRankQuery):
            if q.rank > rank:
                raise ValueError(f"the query of map {name!r} has rank {q.rank} > query_rank {rank}; "
                                 "pass the dense query to reduce its rank")
            out[name] = q
        elif min(q.shape[-2:]) <= rank:
            out[name] = q
        else:
            U, S, Vh = torch.linalg.svd(q.float(), full_matrices=False)
            out[name] = LowRankQuery(U[..., :rank] * S[..., None, :rank], Vh[..., :rank, :].contiguous())
    return out


def stack_queries(sets: Sequence[Mapping[str, Query]]) -> dict[str, Query]:
    """Several sets of queries over the same maps as one: each map's ``K_1 + K_2 + …`` queries in order (rank-r
    factors, as :func:`low_rank_queries` makes them for every set alike, stay factors), so that one pass of
    :func:`score_with_queries` scores them all, e.g. one gradient preconditioned by several curvatures. One set is
    returned as it is."""
    if len(sets) == 1:
        return dict(sets[0])
    out: dict[str, Query] = {}
    for name, first in sets[0].items():
        queries = [s[name] for s in sets]
        if isinstance(first, LowRankQuery):
            out[name] = LowRankQuery(torch.cat([q.left for q in queries]), torch.cat([q.right for q in queries]))
        else:
            out[name] = torch.cat(queries)
    return out


def _flops(a: torch.Tensor, g: torch.Tensor, query: Query) -> tuple[int, int]:
    """Multiply-adds of the per-token path and of the per-example-gradient path for one map and batch."""
    B, T, d_in = a.shape
    K, d_out = query.shape[0], g.shape[-1]
    per_token_query = query.rank * (d_out + d_in) if isinstance(query, LowRankQuery) else d_out * d_in
    return B * T * K * per_token_query, B * d_out * d_in * (T + K)


def example_query_scores(a: torch.Tensor, g: torch.Tensor, query: Query) -> torch.Tensor:
    """Per-example scores ``Σ_t g_tᵀ Q_k a_t`` as ``[B, K]``, by the cheaper contraction for these shapes:
    per token (:func:`token_query_scores` summed over tokens), or through each example's gradient
    ``Σ_t g_t a_tᵀ`` ``[B, d_out, d_in]`` dotted with the (dense) queries — cheaper when K·(rank or d) is large,
    at the memory of one map's per-example gradients."""
    per_token, per_example = _flops(a, g, query)
    if per_token <= per_example:
        return token_query_scores(a, g, query).sum(1)
    dense = query.dense if isinstance(query, LowRankQuery) else query
    grads = g.to(dense.dtype).transpose(1, 2) @ a.to(dense.dtype)
    return grads.flatten(1) @ dense.flatten(1).T


def token_query_scores(a: torch.Tensor, g: torch.Tensor, query: Query) -> torch.Tensor:
    """Per-token scores ``g_tᵀ Q_k a_t`` as ``[B, T, K]`` for ``a`` ``[B,T,d_in]``, ``g`` ``[B,T,d_out]`` and
    ``query`` ``[K, d_out, d_in]`` — one matrix product on the smaller side; for rank-r factors, ``g`` projected
    on ``U_r S_r`` times ``a`` projected on ``V_r``, ``O(T·K·r·(d_out+d_in))``. In the query's dtype."""
    a, g = a.to(query.dtype), g.to(query.dtype)
    B, T, d_in = a.shape
    K, d_out, _ = query.shape
    if isinstance(query, LowRankQuery):
        r = query.rank
        left = g.reshape(B * T, d_out) @ query.left.permute(1, 0, 2).reshape(d_out, K * r)
        right = a.reshape(B * T, d_in) @ query.right.permute(2, 0, 1).reshape(d_in, K * r)
        return (left * right).view(B, T, K, r).sum(-1)
    if d_out <= d_in:
        x = (a.reshape(B * T, d_in) @ query.reshape(K * d_out, d_in).T).view(B, T, K, d_out)
        return torch.einsum("btko,bto->btk", x, g)
    y = (g.reshape(B * T, d_out) @ query.transpose(1, 2).reshape(K * d_in, d_out).T).view(B, T, K, d_in)
    return torch.einsum("btki,bti->btk", y, a)


def _sq_norms(captured: dict, maps: Sequence[LinearMap]) -> torch.Tensor:
    """``‖∇_W L(z)‖²`` summed over ``maps`` per example, ``[B]``: ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s), without
    forming the per-example gradient; in float32."""
    total = None
    for m in maps:
        a, g = captured[m.name]
        if g is None:
            continue
        a, g = a.float(), g.float()
        sq = ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
        total = sq if total is None else total + sq
    if total is None:
        raise ScoringError("no tracked linear map receives gradient from the loss")
    return total


def gradient_norms(adapter: ModelAdapter, examples: Sequence[TokenizedExample], maps: Sequence[LinearMap],
                   settings: ScoringSettings | None = None, *, progress: bool = True, **changes: Any) -> np.ndarray:
    """Each example's loss-gradient norm over ``maps``, ``[N]`` (one forward+backward per batch)."""
    s = (settings or ScoringSettings()).replace(**changes)
    out = []
    for batch, captured in captured_batches(adapter, examples, maps, batch_size=s.batch_size, loss_tokens=s.loss_tokens,
                                            error=ScoringError, desc="gradient norms", progress=progress):
        out.append(_sq_norms(captured, maps).sqrt().cpu().double().numpy())
    return np.concatenate(out)


def score_with_queries(
    adapter: ModelAdapter,
    examples: Sequence[TokenizedExample],
    maps: Sequence[LinearMap],
    queries: dict[str, torch.Tensor],
    settings: ScoringSettings | None = None,
    *,
    estimator: str,
    columns: Sequence[str],
    sign: float = 1.0,
    metadata: dict | None = None,
    progress: bool = True,
    **changes: Any,
) -> Scores:
    """Score every example: ``sign × Σ_maps ⟨Q_map, ∇_map L(z)⟩`` for each of the K queries
    (``queries[name]`` is ``[K, d_out, d_in]``, or its :class:`LowRankQuery`) as ``settings`` say (see
    :class:`ScoringSettings`), with ``changes`` to single settings given as keywords (``batch_size=4,
    per_module=True``). ``per_module`` keeps each map's share; ``per_token`` keeps each example's ``[n_tokens, K]``
    token shares; ``normalize="unit"`` divides each example's scores by its loss-gradient norm over ``maps`` (see
    :func:`gradient_norms`); ``query_rank`` scores with rank-r queries (:func:`low_rank_queries`; pass queries
    factored beforehand to factor them once for many calls)."""
    s = (settings or ScoringSettings()).replace(**changes)
    per_module, per_token = s.per_module, s.per_token
    if not examples:
        raise ScoringError("no examples to score")
    maps = [m for m in maps if m.name in queries]
    if not maps:
        raise ScoringError("none of the tracked linear maps has a query")
    device = adapter.device
    q = low_rank_queries({m.name: queries[m.name].to(device=device, dtype=torch.float32) for m in maps}, s.query_rank)
    if s.query_rank is not None:
        metadata = {**(metadata or {}), "query_rank": s.query_rank}
    K = len(columns)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    module_rows: list[np.ndarray] = []
    token_rows: dict[str, np.ndarray] = {}
    for batch, captured in captured_batches(adapter, examples, maps, batch_size=s.batch_size, loss_tokens=s.loss_tokens,
                                            error=ScoringError, desc=f"score {estimator}", progress=progress):
        per_map = torch.zeros(len(batch), K, len(maps), device=device)
        per_tok = torch.zeros(len(batch), batch.input_ids.shape[1], K, device=device) if per_token else None
        for j, m in enumerate(maps):
            a, g = captured[m.name]
            if g is None:
                continue
            if per_token:
                tok = sign * token_query_scores(a, g, q[m.name])  # [B, T, K]
                per_map[..., j] = tok.sum(1)
                per_tok += tok
            else:
                per_map[..., j] = sign * example_query_scores(a, g, q[m.name])
        if s.normalize == "unit":
            scale = 1.0 / _sq_norms(captured, maps).sqrt().clamp_min(1e-30)  # [B]
            per_map *= scale[:, None, None]
            if per_token:
                per_tok *= scale[:, None, None]
        values = per_map.sum(-1)
        check_finite(values, batch, "gradient score", ScoringError)
        ids.extend(batch.ids)
        rows.append(values.cpu().double().numpy())
        if per_module:
            module_rows.append(per_map.cpu().double().numpy())
        if per_token:
            tok = per_tok.cpu().double().numpy()
            for b, i in enumerate(batch.ids):
                token_rows[i] = tok[b, : int(batch.lengths[b])]
    modules = None
    if per_module:
        stacked = np.concatenate(module_rows)
        modules = {m.name: stacked[..., j] for j, m in enumerate(maps)}
    return Scores(ids, np.concatenate(rows), estimator, list(columns), dict(metadata or {}), modules,
                  token_rows if per_token else None)
