"""Getting an adapter: wrap a model object (:func:`as_adapter`), save and load model folders."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ModelAdapter, resolve_dtype
from .hooked_transformer import HookedTransformerAdapter
from .hugging_face import HFCausalLMAdapter

__all__ = ["as_adapter", "ModelLoadError", "save_model", "load_model"]


def as_adapter(model, tokenizer=None) -> ModelAdapter:
    """Wrap a ``HookedTransformer`` or a Hugging Face causal LM (an adapter is returned unchanged)."""
    if isinstance(model, ModelAdapter):
        return model
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return HookedTransformerAdapter(model, tokenizer)
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):
        if tokenizer is None:
            raise ValueError("a Hugging Face model needs its tokenizer: as_adapter(model, tokenizer)")
        return HFCausalLMAdapter(model, tokenizer)
    raise TypeError(f"unsupported model type {type(model).__name__}: expected a HookedTransformer or a Hugging Face causal LM")


class ModelLoadError(ValueError):
    """A model folder cannot be read; the message names the folder and what is missing or wrong."""


TL_CONFIG_FILE = "tl_config.json"
TL_WEIGHTS_FILE = "model.safetensors"


def save_model(adapter: ModelAdapter, path: str | Path) -> Path:
    """Save a model with its tokenizer in a folder that :func:`load_model` reads: a Hugging Face model with
    ``save_pretrained`` (safetensors), a ``HookedTransformer`` as ``tl_config.json`` + ``model.safetensors``."""
    import json

    from ..fileio import atomic_write_text, save_tensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(adapter, HookedTransformerAdapter):
        cfg = dict(adapter.model.cfg.to_dict())  # to_dict returns the live __dict__
        cfg["dtype"] = str(cfg["dtype"]).removeprefix("torch.")
        cfg["device"] = None
        save_tensors(path / TL_WEIGHTS_FILE, adapter.model.state_dict())
        atomic_write_text(path / TL_CONFIG_FILE, json.dumps(cfg, indent=1, default=str))
    else:
        adapter.model.save_pretrained(path, safe_serialization=True)
    adapter.tokenizer.save_pretrained(path)
    return path


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None) -> ModelAdapter:
    """Load a model folder written by :func:`save_model` or by Hugging Face ``save_pretrained`` (with its
    tokenizer), offline and from safetensors only (pickled ``.bin`` weights are refused).

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"`` or the torch dtype) converts the weights on loading;
    ``None`` or ``"auto"`` keeps the dtype they were saved in. Weights in any other dtype (float64, int8, ...)
    are a :class:`ModelLoadError`."""
    import json

    from ..fileio import load_tensors

    target = resolve_dtype(dtype)
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model folder")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: no readable tokenizer in the model folder ({e})") from None
    if (path / TL_CONFIG_FILE).is_file():
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        try:
            cfg = json.loads((path / TL_CONFIG_FILE).read_text())
            cfg["dtype"] = target or getattr(torch, cfg.get("dtype") or "float32")
            cfg["device"] = device
            cfg = HookedTransformerConfig.from_dict(cfg)
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{path / TL_CONFIG_FILE}: not a HookedTransformer config ({e})") from None
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        state = load_tensors(path / TL_WEIGHTS_FILE, error=ModelLoadError)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"{path / TL_WEIGHTS_FILE}: weights do not fit the config ({e})") from None
        return _adapter(path, HookedTransformerAdapter, model.to(device).eval(), tokenizer)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: neither {TL_CONFIG_FILE} (TransformerLens) nor config.json (Hugging Face) found")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weights"]
        raise ModelLoadError(f"{path}: no safetensors weights ({', '.join(found)}); pickled weights are refused")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                     dtype=target or "auto")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load the Hugging Face model ({e})") from None
    return _adapter(path, HFCausalLMAdapter, model.to(device).eval(), tokenizer)


def _adapter(path: Path, cls: type[ModelAdapter], model, tokenizer) -> ModelAdapter:
    """``cls(model, tokenizer)``; a model it refuses (e.g. weights in an unsupported dtype) is a ModelLoadError."""
    try:
        return cls(model, tokenizer)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
