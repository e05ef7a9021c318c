"""A memory plan before a run (issue 27, item 1): bytes per stage on the device, on the host and on disk, read from the
model's config alone (the model is built on the ``meta`` device: shapes, no weights), and the partitions of maps that
make each pass fit the device.

Formulas (DESIGN.md, "Memory at the paper's scale"), per tracked map of shape d_out × d_in, in the factors' dtype
(float32 unless chosen): covariances d_in² + d_out²; eigenvectors the same again; corrected eigenvalues d_out·d_in;
a concept's query d_out·d_in per concept. A LoRA factor is a map like any other (``lora_A`` r × d_in keeps the
d_in² side, ``lora_B`` d_out × r the d_out² side). The eigendecomposition of an n × n factor works on a float64 copy
and its float64 eigenvectors: 16·n² bytes for the larger side of the map being decomposed.

What else is counted, per rank (an estimate: see :func:`activation_bytes`): the weights in the model's dtype; the
activations kept for the backward of one batch of ``batch_size × max_length`` tokens; each tracked map's captured
input and output gradient for that batch; the full-vocabulary float32 log-softmax and its gradient.

Two engines are planned (``Plan.engine``):

* ``"current"``: what the code does today. All tracked maps are fitted at once (one covariance pass, one eigenvalue
  pass); every factor stays on the device through the eigendecomposition; under ``torchrun`` every rank holds the
  whole model and, after the all-reduce, every factor. ``run`` checks this plan before any work.
* ``"partitioned"``: the engine issue 27 items 3-4 describe. The maps are dealt to the ranks (largest
  eigendecomposition cost first, to the least loaded rank), each rank's maps are split in order into partitions whose
  covariance pass, eigendecomposition (one map at a time, results off the device) and eigenvalue pass each fit the
  device with ``margin`` to spare; each partition costs one covariance and one eigenvalue pass over the data. With
  more than one rank the weights are sharded (FSDP: a rank holds 1/N of them and one whole block at a time) and each
  map's activations go to its owner. ``concept-influence plan`` prints this plan (and says whether the current engine
  fits as well).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import ConceptInfluenceError

__all__ = ["PlanError", "MapShape", "ModelShape", "PlanSettings", "StageBytes", "Plan", "plan_memory", "parse_bytes",
           "format_bytes", "STAGES", "model_shape", "plan_for_config", "PAPER_SHAPES", "paper_config"]

#: The stages of a plan, in run order.
STAGES = ("load", "covariance pass", "eigendecomposition", "eigenvalue pass", "query", "scoring", "index build")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


class PlanError(ConceptInfluenceError, ValueError):
    """A plan cannot be made (unreadable model config, bad size) or, from ``check``, does not fit."""


# ---- sizes ------------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"80GiB"``, ``"80GB"`` (10⁹), ``"1.5TiB"``, or a number of bytes; None stays None."""
    if text is None or isinstance(text, (int, float)) and not isinstance(text, bool):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise PlanError(f"cannot read the size {text!r}: expected a number with a unit such as 80GiB, 80GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    """Bytes in decimal units, as the issue's numbers are: ``133.6 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---- shapes -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapShape:
    """One tracked linear map: its name, block and shape ``(d_out, d_in)``."""

    name: str
    block: int
    d_out: int
    d_in: int

    def covariance_elements(self) -> int:
        return self.d_in**2 + self.d_out**2

    def matrix_elements(self) -> int:
        return self.d_out * self.d_in

    def eig_cost(self) -> int:
        return self.d_in**3 + self.d_out**3

    def workspace_bytes(self) -> int:
        """The eigendecomposition's float64 copy and eigenvectors of the larger side."""
        return 16 * max(self.d_in, self.d_out) ** 2


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: the tracked maps, the bytes of all weights and of the largest block, the widths
    that size the activations, the dtype it computes in."""

    name: str
    maps: tuple[MapShape, ...]
    weight_bytes: int
    block_weight_bytes: int
    n_blocks: int
    d_model: int
    d_mlp: int
    vocab: int
    dtype: str = "float32"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @classmethod
    def from_adapter(cls, adapter, maps: Sequence | None = None, name: str = "model") -> "ModelShape":
        """From a :class:`~concept_influence.models.ModelAdapter` (its model may be on the ``meta`` device)."""
        import torch

        maps = adapter.linear_maps() if maps is None else list(maps)
        params = list(adapter.model.parameters())
        emb_in = adapter.model.get_input_embeddings() if hasattr(adapter.model, "get_input_embeddings") else None
        dtype = str(emb_in.weight.dtype if emb_in is not None else adapter.model.cfg.dtype).removeprefix("torch.")
        blocks = getattr(adapter, "blocks", None) or getattr(adapter.model, "blocks", None)
        block_bytes = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0) \
            if blocks is not None else 0
        d_mlp = max((max(m.shape) for m in adapter._linear_maps() if m.kind == "mlp"), default=4 * adapter.d_model)
        emb = adapter.model.get_output_embeddings() if hasattr(adapter.model, "get_output_embeddings") else None
        vocab = emb.weight.shape[0] if isinstance(emb, torch.nn.Module) and hasattr(emb, "weight") else \
            getattr(getattr(adapter.model, "cfg", None), "d_vocab", 0)
        return cls(name, tuple(MapShape(m.name, m.block, *m.shape) for m in maps),
                   sum(p.numel() * p.element_size() for p in params), block_bytes, adapter.n_blocks, adapter.d_model,
                   int(d_mlp), int(vocab), dtype if dtype in DTYPE_BYTES else "float32")

    @classmethod
    def from_dict(cls, data: dict) -> "ModelShape":
        """From a dict of shapes: ``{"name", "maps": {name: [d_out, d_in]} (block read from "blocks.{l}."),
        "weight_bytes", "block_weight_bytes", "n_blocks", "d_model", "d_mlp", "vocab", "dtype"}``."""
        from .models import block_of_hook

        maps = tuple(MapShape(n, block_of_hook(n) or 0, int(s[0]), int(s[1])) for n, s in data["maps"].items())
        keys = ("weight_bytes", "block_weight_bytes", "n_blocks", "d_model", "d_mlp", "vocab")
        return cls(data.get("name", "model"), maps, *(int(data[k]) for k in keys), data.get("dtype", "float32"))


def _meta_hf_model(config, dtype: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    target = dtype if dtype not in (None, "auto") else str(config.to_dict().get("dtype") or "float32")
    target = target.removeprefix("torch.")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, target))


#: Hugging Face config keys of the paper-scale shapes (the plan needs no weights: the model is built on ``meta``).
PAPER_SHAPES = {
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
    "Llama-3-70B": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)),
}


def paper_config(name: str, dtype: str = "bfloat16"):
    """The transformers config of one of :data:`PAPER_SHAPES` (``"Qwen2.5-7B"``, ``"Llama-3-70B"``)."""
    from transformers import AutoConfig

    if name not in PAPER_SHAPES:
        raise PlanError(f"unknown shape {name!r}; known: {', '.join(PAPER_SHAPES)}")
    model_type, keys = PAPER_SHAPES[name]
    config = AutoConfig.for_model(model_type, **keys)
    config.dtype = dtype
    config.name_or_path = name
    return config


def model_shape(source: str | Path | dict | Any, *, dtype: str | None = None, track: str = "auto",
                select=None, max_block: int | None = None, base: str | Path | None = None,
                lora_rank: int | None = None, lora_targets: str | list[str] = "all-linear") -> ModelShape:
    """The shapes of a model, built on the ``meta`` device from its config (no weights are read): a model folder
    (Hugging Face ``config.json``, a PEFT adapter folder on its base's config, or a TransformerLens ``tl_config.json``),
    a ``config.json`` file, a transformers ``PretrainedConfig``, or a dict of shapes (:meth:`ModelShape.from_dict`).
    ``lora_rank`` adds LoRA adapters of that rank on ``lora_targets`` (PEFT's ``target_modules``) to a Hugging Face
    model. ``track`` / ``select`` / ``max_block`` choose the maps as a run does."""
    import torch

    from .models import HFCausalLMAdapter, HookedTransformerAdapter

    if isinstance(source, dict):
        return ModelShape.from_dict(source)
    name = "model"
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):  # a transformers config
        model, name = _meta_hf_model(source, dtype), getattr(source, "name_or_path", "") or source.model_type
    else:
        path = Path(source)
        folder = path.parent if path.is_file() else path
        name = folder.name
        if (folder / "tl_config.json").is_file():
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            cfg = json.loads((folder / "tl_config.json").read_text())
            cfg["dtype"] = getattr(torch, dtype if dtype not in (None, "auto") else (cfg.get("dtype") or "float32"))
            cfg["device"] = None
            with torch.device("meta"):
                model = HookedTransformer(HookedTransformerConfig.from_dict(cfg), move_to_device=False)
            adapter = HookedTransformerAdapter(model, tokenizer=object())
            return _shape(adapter, track, select, max_block, name)
        model = _meta_peft_or_hf(folder, path, dtype, base)
    if lora_rank is not None:
        import peft

        with torch.device("meta"):
            model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                               target_modules=lora_targets))
        name = f"{name} LoRA r={lora_rank}"
    return _shape(HFCausalLMAdapter(model, None, track=track), track, select, max_block, name)


def _meta_peft_or_hf(folder: Path, path: Path, dtype: str | None, base: str | Path | None):
    import torch
    from transformers import AutoConfig

    adapter_cfg = folder / "adapter_config.json"
    try:
        if adapter_cfg.is_file():
            import peft

            lora = json.loads(adapter_cfg.read_text())
            base_folder = Path(base) if base else Path(lora.get("base_model_name_or_path") or "")
            if not base_folder.is_absolute() and not base_folder.is_dir():
                base_folder = folder / base_folder
            model = _meta_hf_model(AutoConfig.from_pretrained(str(base_folder), local_files_only=True), dtype)
            config = peft.LoraConfig(**{k: v for k, v in lora.items() if k in peft.LoraConfig.__dataclass_fields__
                                        and k not in ("base_model_name_or_path", "revision")})
            with torch.device("meta"):
                return peft.get_peft_model(model, config)
        config_file = path if path.is_file() else folder / "config.json"
        if not config_file.is_file():
            raise PlanError(f"{path}: no config.json, tl_config.json or adapter_config.json to plan from")
        return _meta_hf_model(AutoConfig.from_pretrained(str(config_file), local_files_only=True), dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"{path}: cannot build the model from its config ({str(e).splitlines()[0]})") from None


def _shape(adapter, track, select, max_block, name) -> ModelShape:
    if select is not None:
        adapter.select(select)
    return ModelShape.from_adapter(adapter, adapter.linear_maps(max_block), name)


# ---- the plan ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanSettings:
    """What a plan is made for. ``device_memory`` / ``host_memory``: bytes per device and per host (None: no limit);
    ``margin``: the fraction of the device kept free; ``batch_size × max_length`` tokens per forward and backward (per
    rank); ``concepts``: K queries; ``examples``: training examples scored; ``factor_dtype``: covariances,
    eigenvectors and eigenvalues; ``strategy``: ekfac (two passes) or kfac (one); ``index_bytes``: an index's bytes
    per example; ``engine``: current or partitioned (module docstring); ``query_rank``: rank-r queries (None: full
    size, or with the partitioned engine the largest rank that fits when full-size ones do not)."""

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

    def __post_init__(self) -> None:
        if self.engine not in ("current", "partitioned"):
            raise PlanError(f"engine must be current or partitioned, got {self.engine!r}")
        if self.factor_dtype not in DTYPE_BYTES:
            raise PlanError(f"factor_dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.factor_dtype!r}")
        if self.world_size < 1 or self.batch_size < 1 or self.max_length < 1 or self.concepts < 1:
            raise PlanError("world_size, batch_size, max_length and concepts must be >= 1")
        if not 0 <= self.margin < 1:
            raise PlanError(f"margin must be in [0, 1), got {self.margin}")

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
        """Passes over the training data to fit the factors: one covariance pass (and with EK-FAC one eigenvalue pass)
        per partition."""
        return self.n_partitions * (2 if self.settings.strategy == "ekfac" else 1)

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
                head.append(f"partition {i} ({who}): {len(names)} maps, {_span(names)}")
        return "\n".join(head)


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def activation_bytes(model: ModelShape, tokens: int) -> int:
    """Activations kept for one batch's backward, an estimate: per block and token ~10 widths of d_model and 4 of d_mlp
    in the model's dtype (norm inputs and outputs, q/k/v, attention output, residuals; gate, up, activation and their
    product), attention through SDPA (no tokens² scores); plus the logits and the float32 log-softmax and gradient
    over the vocabulary."""
    per_block = tokens * (10 * model.d_model + 4 * model.d_mlp) * model.dtype_bytes
    return model.n_blocks * per_block + tokens * model.vocab * (model.dtype_bytes + 12)


def _deal(maps: Sequence[MapShape], ranks: int) -> list[list[MapShape]]:
    """Maps dealt to ranks, largest eigendecomposition cost first to the least loaded; each rank's in model order."""
    load = [0] * ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(maps)), key=lambda i: -maps[i].eig_cost()):
        r = min(range(ranks), key=lambda r: load[r])
        owned[r].append(i)
        load[r] += maps[i].eig_cost()
    return [[maps[i] for i in sorted(idx)] for idx in owned]


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
        if self.s.strategy == "ekfac":
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


def _partition(maps: list[MapShape], c: _Costs, limit: float | None) -> tuple[list[list[MapShape]], str | None]:
    """Greedy, in order: a map joins the current partition while every pass of the partition fits ``limit``."""
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
    if s.strategy == "ekfac":
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


# ---- from a run config ------------------------------------------------------------------------------------------------
def plan_for_config(config, settings: PlanSettings | None = None, **changes: Any) -> Plan:
    """The plan of a :class:`~concept_influence.config.RunConfig`: its model (built on the meta device from the
    config of ``[model] path``), its tracked maps (``[model] track``, blocks up to the probe's hook), batch size,
    strategy and lengths."""
    from .models import block_of_hook
    from .runs.checkpoints import model_folder

    m = config.model
    shape = model_shape(model_folder(m), dtype=m.dtype, track=m.weights_track, select=m.selection,
                        max_block=block_of_hook(config.probe.hook), base=m.base)
    base = settings or PlanSettings()
    s = replace(base, batch_size=config.factors.batch_size, max_length=config.data.max_length,
                strategy=config.factors.strategy)
    return plan_memory(shape, s, **changes)
