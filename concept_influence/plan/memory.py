"""The plan itself: bytes per stage from the formulas of :mod:`concept_influence.plan`, the maps dealt to ranks and cut
into partitions that fit the device."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from .report import Plan, PlanSettings, StageBytes, name_span
from .shapes import DTYPE_BYTES, MapShape, ModelShape, PlanError, deal, format_bytes

__all__ = ["plan_memory", "activation_bytes", "QUERY_RANKS"]


def activation_bytes(model: ModelShape, tokens: int) -> int:
    """Activations kept for one batch's backward, an estimate: per block and token ~10 widths of d_model and 4 of d_mlp
    in the model's dtype (norm inputs and outputs, q/k/v, attention output, residuals; gate, up, activation and their
    product), attention through SDPA (no tokens² scores); plus the logits and the float32 log-softmax and gradient
    over the vocabulary."""
    per_block = tokens * (10 * model.d_model + 4 * model.d_mlp) * model.dtype_bytes
    return model.n_blocks * per_block + tokens * model.vocab * (model.dtype_bytes + 12)


def _deal(maps: Sequence[MapShape], ranks: int) -> list[list[MapShape]]:
    """Maps dealt to ranks, largest eigendecomposition cost first to the least loaded; each rank's in model order."""
    return [[maps[i] for i in idx] for idx in deal([m.eig_cost() for m in maps], ranks)]


class _Costs:
    def __init__(self, model: ModelShape, s: PlanSettings):
        self.m, self.s = model, s
        self.fb = DTYPE_BYTES[s.factor_dtype]
        self.sharded = s.engine == "partitioned" and s.world_size > 1
        self.resident = (model.weight_bytes // s.world_size + model.block_weight_bytes) if self.sharded \
            else model.weight_bytes
        self.act = activation_bytes(model, s.tokens)
        self.route = s.world_size if self.sharded else 1  # a map's output gradients from every rank go to its owner

    def captured(self, maps) -> int:
        """The output gradients g of ``maps`` held for one batch (their inputs a alias activations kept anyway)."""
        return self.s.tokens * sum(m.d_out for m in maps) * self.m.dtype_bytes * self.route

    def cov(self, maps) -> int:
        return self.fb * sum(m.covariance_elements() for m in maps)

    def lam(self, maps) -> int:
        return self.fb * sum(m.matrix_elements() for m in maps)

    def query(self, maps, rank: int | None) -> int:
        """K queries of ``maps`` in float32: full size, or of rank ``rank`` (r·(d_out + d_in) per map)."""
        per = (lambda m: m.matrix_elements()) if rank is None else (lambda m: min(m.matrix_elements(),
                                                                                  rank * (m.d_out + m.d_in)))
        return 4 * self.s.concepts * sum(per(m) for m in maps)

    def covariance_pass(self, maps) -> tuple[int, str]:
        tmp = max((self.fb * m.covariance_elements() for m in maps), default=0)
        return (self.resident + self.act + self.captured(maps) + self.cov(maps) + tmp,
                f"covariances {format_bytes(self.cov(maps))}, activations {format_bytes(self.act)}")

    def eigendecomposition(self, maps) -> tuple[int, str]:
        ws = max((m.workspace_bytes() for m in maps), default=0)
        if self.s.engine == "current":  # every covariance and eigenbasis stays on the device (no eigenvalues yet)
            return (self.resident + 2 * self.cov(maps) + ws,
                    f"covariances + eigenvectors {format_bytes(2 * self.cov(maps))}, float64 workspace {format_bytes(ws)}")
        one = max((self.fb * m.covariance_elements() + m.workspace_bytes() for m in maps), default=0)
        return (self.resident + self.cov(maps) + one,
                f"covariances {format_bytes(self.cov(maps))}, one map's eigenvectors + float64 workspace "
                f"{format_bytes(one)}")

    def eigenvalue_pass(self, maps) -> tuple[int, str]:
        tmp = max((2 * self.fb * m.matrix_elements() for m in maps), default=0)
        return (self.resident + self.act + self.captured(maps) + self.cov(maps) + self.lam(maps) + tmp,
                f"eigenvectors {format_bytes(self.cov(maps))}, eigenvalue sums {format_bytes(self.lam(maps))}")

    def passes(self, maps) -> list[tuple[str, int, str]]:
        out = [("covariance pass", *self.covariance_pass(maps)), ("eigendecomposition", *self.eigendecomposition(maps))]
        if "eigenvalues" in self.s.passes:
            out.append(("eigenvalue pass", *self.eigenvalue_pass(maps)))
        return out

    def query_stage(self, owned, rank: int | None) -> int:
        """Forming and preconditioning the queries: the current engine forms the full gradient (on the host, then
        the device) and preconditions it with every factor on the device; the partitioned one preconditions map by
        map, streaming each map's factors, and keeps its own maps' queries (of rank ``rank`` when set)."""
        if self.s.engine == "current":
            return self.resident + self.act + self.query(owned, None) + self.cov(owned) + self.lam(owned)
        one = max(self.fb * (m.covariance_elements() + m.matrix_elements()) + self.query([m], None) for m in owned)
        return self.resident + self.act + self.query(owned, rank) + one

    def scoring_stage(self, owned, rank: int | None) -> int:
        factors = self.cov(owned) + self.lam(owned) if self.s.engine == "current" else 0
        return self.resident + self.act + self.captured(owned) + self.query(owned, rank) + factors


#: Query ranks the partitioned engine tries, largest first, when the full queries do not fit.
QUERY_RANKS = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def _given(maps: list[MapShape], c: _Costs, limit: float | None) -> tuple[list[list[MapShape]], str | None]:
    """``settings.partitions`` as maps, and the first pass of a partition that does not fit ``limit``."""
    by_name = {m.name: m for m in maps}
    named = [n for names in c.s.partitions for n in names]
    if sorted(named) != sorted(by_name):
        raise PlanError("partitions must name every tracked map once; they name "
                        f"{', '.join(sorted(set(named) ^ set(by_name))[:3])} wrongly")
    parts = [[by_name[n] for n in names] for names in c.s.partitions]
    for i, part in enumerate(parts):
        over = [(st, b) for st, b, _ in c.passes(part) if limit is not None and b > limit]
        if over:
            return parts, (f"{over[0][0]}: {format_bytes(over[0][1])} on the device for partition {i} ({len(part)} "
                           f"maps, {name_span([m.name for m in part])}) > {format_bytes(limit)} usable: more partitions "
                           "leave more room")
    return parts, None


def _partition(maps: list[MapShape], c: _Costs, limit: float | None) -> tuple[list[list[MapShape]], str | None]:
    """Greedy, in order: a map joins the current partition while every pass of the partition fits ``limit``."""
    if c.s.partitions is not None:
        return _given(maps, c, limit)
    if limit is None or c.s.engine == "current":
        return ([list(maps)] if maps else []), None
    parts: list[list[MapShape]] = []
    current: list[MapShape] = []
    for m in maps:
        trial = current + [m]
        if all(b <= limit for _, b, _ in c.passes(trial)):
            current = trial
            continue
        if current:
            parts.append(current)
        current = [m]
        over = [(st, b) for st, b, _ in c.passes(current) if b > limit]
        if over:
            st, b = over[0]
            return parts + [current], (
                f"{st}: {format_bytes(b)} on the device for the map {m.name} ({m.d_out} × {m.d_in}) alone > "
                f"{format_bytes(limit)} usable (weights {format_bytes(c.resident)}, activations of "
                f"{c.s.batch_size} × {c.s.max_length} tokens {format_bytes(c.act)}: a smaller batch_size or max_length "
                "leaves more room)")
    if current:
        parts.append(current)
    return parts, None


def plan_memory(model: ModelShape, settings: PlanSettings | None = None, **changes: Any) -> Plan:
    """The plan for ``model`` as ``settings`` say (single changes as keywords: ``plan_memory(shape,
    device_memory=80 * 10**9, world_size=8)``)."""
    s = replace(settings or PlanSettings(), **changes)
    if not model.maps:
        raise PlanError(f"{model.name}: no linear map is tracked")
    c, n, current, limit = _Costs(model, s), s.world_size, s.engine == "current", s.device_limit
    owned = _deal(model.maps, n) if c.sharded else [list(model.maps)]
    parts_by_rank, failure = [], None
    for maps in owned:
        parts, problem = _partition(maps, c, limit)
        parts_by_rank.append(parts)
        failure = failure or problem
    all_maps = list(model.maps)
    totals = {"covariances": c.cov(all_maps), "eigenvectors": c.cov(all_maps), "eigenvalues": c.lam(all_maps),
              "query": c.query(all_maps, None) // s.concepts}
    # the query rank: as set, else full size, else (partitioned engine) the largest rank whose query and scoring fit
    rank = s.query_rank
    if rank is None and not current and limit is not None and \
            max(max(c.query_stage(o, None), c.scoring_stage(o, None)) for o in owned) > limit:
        rank = next((r for r in QUERY_RANKS if max(max(c.query_stage(o, r), c.scoring_stage(o, r)) for o in owned)
                     <= limit), QUERY_RANKS[-1])
    peaks: dict[str, tuple[int, str]] = {}
    for parts in parts_by_rank:
        for part in parts:
            for stage, b, note in c.passes(part):
                if b > peaks.get(stage, (-1, ""))[0]:
                    peaks[stage] = (b, note)
    biggest = max(all_maps, key=lambda m: m.covariance_elements())
    largest_part = lambda f: max(f(p) for parts in parts_by_rank for p in parts)  # noqa: E731
    per_rank_factors = max(c.cov(o) + c.lam(o) for o in owned)
    statistics = lambda total: total * (1 + n) if current else 2 * total  # noqa: E731 (summed file + rank checkpoints)
    stages = [StageBytes("load", c.resident, n * c.resident if c.sharded else n * model.weight_bytes, 0,
                         f"weights {format_bytes(model.weight_bytes)}" + (f", 1/{n} per rank + one block"
                                                                          if c.sharded else ""))]
    stages.append(StageBytes("covariance pass", peaks["covariance pass"][0], n * largest_part(c.cov),
                             statistics(totals["covariances"]), peaks["covariance pass"][1]))
    stages.append(StageBytes("eigendecomposition", peaks["eigendecomposition"][0],
                             n * (per_rank_factors if current else c.fb * biggest.covariance_elements()),
                             totals["eigenvectors"] + totals["eigenvalues"], peaks["eigendecomposition"][1]))
    if "eigenvalues" in s.passes:
        stages.append(StageBytes("eigenvalue pass", peaks["eigenvalue pass"][0], n * largest_part(c.lam),
                                 totals["eigenvectors"] + statistics(totals["eigenvalues"]), peaks["eigenvalue pass"][1]))
    q_rank = max(c.query(o, rank) for o in owned)
    what = "full-size" if rank is None else f"rank-{rank}"
    where = "" if not c.sharded else ", each rank its own maps'"
    stages.append(StageBytes("query", max(c.query_stage(o, rank) for o in owned),
                             n * c.query(all_maps, None) if current else 0, 0,
                             f"{s.concepts} {what} query(s) {format_bytes(q_rank)}{where}, " +
                             ("every factor on the device" if current else "factors streamed map by map")))
    stages.append(StageBytes("scoring", max(c.scoring_stage(o, rank) for o in owned), 0, 4 * s.concepts * s.examples,
                             f"queries {format_bytes(q_rank)}, output gradients of a batch "
                             f"{format_bytes(max(c.captured(o) for o in owned))}"))
    stages.append(StageBytes("index build", c.resident + c.act + c.captured(all_maps) // c.route
                             + s.batch_size * s.index_bytes, 0, s.examples * s.index_bytes,
                             f"{format_bytes(s.index_bytes)} per example"))
    if failure is None and limit is not None:
        over = next((st for st in stages if st.device > limit), None)
        if over is not None:
            hint = (" (the current engine holds every map's factors at once; `concept-influence plan` shows the "
                    "partitions that would fit)") if current else ""
            failure = (f"{over.stage}: {format_bytes(over.device)} on the device > {format_bytes(limit)} usable of "
                       f"{format_bytes(s.device_memory)}{hint}")
    if failure is None and s.host_memory is not None:
        over = next((st for st in stages if st.host > s.host_memory), None)
        if over is not None:
            failure = f"{over.stage}: {format_bytes(over.host)} on the host > {format_bytes(s.host_memory)}"
    names = [[[m.name for m in p] for p in parts] for parts in parts_by_rank]
    return Plan(model, s, stages, names, failure, totals, rank)
