"""A plan's settings and result: :class:`PlanSettings`, :class:`StageBytes` per stage, :class:`Plan` (partitions,
passes, the first stage that does not fit) and how it is printed."""

from __future__ import annotations

from dataclasses import dataclass, field

from .shapes import DTYPE_BYTES, ModelShape, PlanError, format_bytes

__all__ = ["PlanSettings", "StageBytes", "Plan", "name_span"]


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is made for. ``device_memory`` / ``host_memory``: bytes per device and per host (None: no limit);
    ``margin``: the fraction of the device kept free; ``batch_size × max_length`` tokens per forward and backward (per
    rank); ``concepts``: K queries; ``examples``: training examples scored; ``factor_dtype``: covariances,
    eigenvectors and eigenvalues; ``strategy``: a curvature strategy fitted in passes over the data (ekfac: two, kfac:
    one); ``index_bytes``: an index's bytes per example; ``engine``: current or partitioned (module docstring);
    ``query_rank``: rank-r queries (None: full size, or with the partitioned engine the largest rank that fits when
    full-size ones do not); ``partitions``: the partitioned engine's groups of map names as a run fits them (``[factors]
    partitions = N``), planned as given on one rank (None: the plan chooses them)."""

    device_memory: int | None = None
    host_memory: int | None = None
    world_size: int = 1
    margin: float = 0.1
    batch_size: int = 8
    max_length: int = 512
    concepts: int = 1
    examples: int = 1000
    factor_dtype: str = "float32"
    strategy: str = "ekfac"
    index_bytes: int = 65536
    engine: str = "partitioned"
    query_rank: int | None = None
    partitions: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.engine not in ("current", "partitioned"):
            raise PlanError(f"engine must be current or partitioned, got {self.engine!r}")
        if self.partitions is not None and (self.engine != "partitioned" or self.world_size != 1):
            raise PlanError("partitions are given for the partitioned engine on one rank (with more ranks the plan "
                            "deals the maps itself)")
        if self.factor_dtype not in DTYPE_BYTES:
            raise PlanError(f"factor_dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.factor_dtype!r}")
        if self.world_size < 1 or self.batch_size < 1 or self.max_length < 1 or self.concepts < 1:
            raise PlanError("world_size, batch_size, max_length and concepts must be >= 1")
        if not 0 <= self.margin < 1:
            raise PlanError(f"margin must be in [0, 1), got {self.margin}")
        from ..curvature.registry import FITTED_FROM_DATA

        if self.strategy not in FITTED_FROM_DATA:
            raise PlanError(f"strategy must be one of {', '.join(FITTED_FROM_DATA)}, got {self.strategy!r}")

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes over the data that fitting ``strategy`` makes (:mod:`concept_influence.curvature.registry`)."""
        from ..curvature.registry import passes

        return passes(self.strategy)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length

    @property
    def device_limit(self) -> float | None:
        return None if self.device_memory is None else self.device_memory * (1 - self.margin)


@dataclass
class StageBytes:
    """Peak bytes of one stage: per rank on the device, per host (all ranks of a node), and on disk (what the stage
    has written by its end); ``note`` says what dominates."""

    stage: str
    device: int
    host: int
    disk: int
    note: str = ""


@dataclass
class Plan:
    """A plan: per-stage bytes, the partitions of each rank's maps, the passes over the data they cost, and the
    first stage that does not fit (None when all fit)."""

    model: ModelShape
    settings: PlanSettings
    stages: list[StageBytes]
    partitions: list[list[list[str]]]  # per rank, per partition, map names
    failure: str | None = None
    totals: dict[str, int] = field(default_factory=dict)
    query_rank: int | None = None  # as set, or chosen because full-size queries do not fit

    @property
    def fits(self) -> bool:
        return self.failure is None

    @property
    def engine(self) -> str:
        return self.settings.engine

    @property
    def n_partitions(self) -> int:
        return max((len(p) for p in self.partitions), default=0)

    @property
    def factor_passes(self) -> int:
        """Passes over the training data to fit the factors: the strategy's passes (a covariance pass, and with EK-FAC
        an eigenvalue pass) per partition."""
        return self.n_partitions * len(self.settings.passes)

    def check(self) -> None:
        """Raise :class:`PlanError` with one line naming the stage and the bytes when the plan does not fit."""
        if self.failure:
            raise PlanError(self.failure)

    def summary(self) -> str:
        s = self.settings
        where = f"{s.world_size} × {format_bytes(s.device_memory)}" if s.device_memory else "no device limit"
        verdict = "fits" if self.fits else f"does not fit: {self.failure}"
        return (f"{self.model.name}: {len(self.model.maps)} maps, {self.n_partitions} partition(s) per rank, "
                f"{self.factor_passes} passes over the data for the factors ({where}, {s.engine} engine): {verdict}")

    def table(self) -> str:
        """The stages as a markdown table."""
        lines = ["| stage | device (per rank) | host (per node) | disk | what dominates |", "|---|---|---|---|---|"]
        for st in self.stages:
            lines.append(f"| {st.stage} | {format_bytes(st.device)} | {format_bytes(st.host)} | {format_bytes(st.disk)} "
                         f"| {st.note} |")
        return "\n".join(lines)

    def describe(self) -> str:
        """What ``concept-influence plan`` prints."""
        s, t = self.settings, self.totals
        head = [self.summary(), "",
                f"tracked: {len(self.model.maps)} maps in {self.model.dtype}; factors in {s.factor_dtype}: covariances "
                f"{format_bytes(t['covariances'])}, eigenvectors {format_bytes(t['eigenvectors'])}, eigenvalues "
                f"{format_bytes(t['eigenvalues'])}; a query {format_bytes(t['query'])} per concept; weights "
                f"{format_bytes(self.model.weight_bytes)}",
                f"per batch: {s.batch_size} × {s.max_length} tokens per rank; margin {s.margin:.0%} of the device; "
                f"{s.concepts} concept(s), {s.examples} examples scored; queries "
                + ("full size" if self.query_rank is None else f"of rank {self.query_rank}"
                   + (" (set)" if s.query_rank else " (chosen: full-size queries do not fit)")),
                "", self.table(), ""]
        for rank, parts in enumerate(self.partitions[:1] if len(self.partitions) > 1 else self.partitions):
            who = "rank 0's maps" if len(self.partitions) > 1 else "maps"
            for i, names in enumerate(parts):
                head.append(f"partition {i} ({who}): {len(names)} maps, {name_span(names)}")
        return "\n".join(head)


def name_span(names: list[str]) -> str:
    """``first .. last`` of a partition's map names (the name alone for one)."""
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
