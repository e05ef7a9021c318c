"""What a plan reads of a model: the tracked maps' shapes, the weights' bytes and the widths, from its config alone (the
model is built on the ``meta`` device); sizes in bytes, read and written."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConceptInfluenceError

__all__ = ["PlanError", "MapShape", "ModelShape", "model_shape", "parse_bytes", "parse_device_memory", "format_bytes",
           "deal", "STAGES", "DTYPE_BYTES",
           "PAPER_SHAPES", "paper_config"]

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


def parse_device_memory(value: str) -> int | None:
    """A run config's ``[model] device_memory``: ``"auto"`` and ``"none"`` give None (resolved by the run), a size its
    bytes; anything else is a ``ValueError`` naming the key."""
    if value in ("auto", "none"):
        return None
    try:
        return parse_bytes(value)
    except PlanError as e:
        raise ValueError(f"device_memory: {e} (or auto, none)") from None


def format_bytes(n: int | float) -> str:
    """Bytes in decimal units, as the issue's numbers are: ``133.6 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def deal(costs: Sequence[float], ranks: int) -> list[list[int]]:
    """Items of ``costs`` dealt to ``ranks`` ranks: the costliest first, each to the least loaded rank (the lowest on a
    tie); each rank's indices in order. Deterministic, so every rank deals the same (the plan's owner ranks and the
    run's, :mod:`concept_influence.runs.owners`)."""
    load, owned = [0.0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(ranks), key=lambda r: load[r])
        owned[r].append(i)
        load[r] += costs[i]
    return [sorted(idx) for idx in owned]


# ---- shapes -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapShape:
    """One tracked linear map: its name, block and shape ``(d_out, d_in)``."""

    name: str
    block: int
    d_out: int
    d_in: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``, as a :class:`~concept_influence.models.LinearMap` has it."""
        return self.d_out, self.d_in

    def covariance_elements(self) -> int:
        return self.d_in**2 + self.d_out**2

    def matrix_elements(self) -> int:
        return self.d_out * self.d_in

    def eig_cost(self) -> int:
        return self.d_in**3 + self.d_out**3

    def workspace_bytes(self) -> int:
        """The eigendecomposition's float64 temporaries on the larger side: its input, its eigenvectors and LAPACK
        ``syevd``'s work array of 2n² (32 n² bytes; 34.6 n² measured on the CPU at n = 3000 with the float32 result,
        :func:`concept_influence.curvature.core._eigh`)."""
        return 32 * max(self.d_in, self.d_out) ** 2


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
        from ..models import block_of_hook

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

    from ..models import HFCausalLMAdapter, HookedTransformerAdapter

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

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, reached through PEFT
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
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
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
