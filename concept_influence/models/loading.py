"""Getting an adapter: wrap a model object (:func:`as_adapter`), save and load model folders."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import ConceptInfluenceError
from .base import ModelAdapter, resolve_dtype
from .hooked_transformer import HookedTransformerAdapter
from .hugging_face import HFCausalLMAdapter

__all__ = ["as_adapter", "ModelLoadError", "save_model", "load_model", "load_checkpoint", "checkpointed_weights"]


def as_adapter(model, tokenizer=None, track: str = "auto") -> ModelAdapter:
    """Wrap a ``HookedTransformer`` or a Hugging Face causal LM, also a PEFT ``PeftModel`` (an adapter is returned
    unchanged). ``track`` chooses the weight matrices of a LoRA fine-tune (see :class:`HFCausalLMAdapter`)."""
    if isinstance(model, ModelAdapter):
        return model
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return HookedTransformerAdapter(model, tokenizer)
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):
        if tokenizer is None:
            raise ValueError("a Hugging Face model needs its tokenizer: as_adapter(model, tokenizer)")
        return HFCausalLMAdapter(model, tokenizer, track=track)
    raise TypeError(f"unsupported model type {type(model).__name__}: expected a HookedTransformer or a Hugging Face causal LM")


class ModelLoadError(ConceptInfluenceError, ValueError):
    """A model folder cannot be read; the message names the folder and what is missing or wrong."""


TL_CONFIG_FILE = "tl_config.json"
TL_WEIGHTS_FILE = "model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


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
    else:  # a PeftModel saves its adapter only (adapter_config.json + adapter_model.safetensors)
        adapter.model.save_pretrained(path, safe_serialization=True)
    adapter.tokenizer.save_pretrained(path)
    return path


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None, *,
               base: str | Path | None = None, track: str = "auto") -> ModelAdapter:
    """Load a model folder written by :func:`save_model` or by Hugging Face ``save_pretrained`` (with its
    tokenizer), offline and from safetensors only (pickled ``.bin`` weights are refused).

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"`` or the torch dtype) converts the weights on loading;
    ``None`` or ``"auto"`` keeps the dtype they were saved in. Weights in any other dtype (float64, int8, ...)
    are a :class:`ModelLoadError`.

    A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is loaded on top of its base
    model folder: ``base``, or else the ``base_model_name_or_path`` the adapter records (a relative path is read
    from the current folder, then from the adapter's). ``track`` chooses the tracked weight matrices
    (see :class:`HFCausalLMAdapter`)."""
    target = resolve_dtype(dtype)
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model folder")
    if (path / PEFT_CONFIG_FILE).is_file():
        return _load_peft(path, device, target, base, track)
    tokenizer = _load_tokenizer(path)
    if (path / TL_CONFIG_FILE).is_file():
        model = _load_hooked_transformer(path, tokenizer, device, target)
        return _adapter(path, HookedTransformerAdapter, model, tokenizer)
    return _adapter(path, partial(HFCausalLMAdapter, track=track), _load_hf_model(path, target).to(device).eval(), tokenizer)


def _load_tokenizer(path: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: no readable tokenizer in the model folder ({e})") from None


def _load_hooked_transformer(path: Path, tokenizer, device: str, target: torch.dtype | None):
    import json

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ..fileio import load_tensors

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
    return model.to(device).eval()


def _load_hf_model(path: Path, target: torch.dtype | None):
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: neither {TL_CONFIG_FILE} (TransformerLens), config.json (Hugging Face) nor "
                             f"{PEFT_CONFIG_FILE} (PEFT adapter) found")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weights"]
        raise ModelLoadError(f"{path}: no safetensors weights ({', '.join(found)}); pickled weights are refused")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                    dtype=target or "auto")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load the Hugging Face model ({e})") from None


def _adapter(path: Path, cls: Callable[..., ModelAdapter], model, tokenizer) -> ModelAdapter:
    """``cls(model, tokenizer)``; a model it refuses (e.g. weights in an unsupported dtype) is a ModelLoadError."""
    try:
        return cls(model, tokenizer)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None


_GIVE_BASE = "give the base model folder (load_model(..., base=...), or base = ... in the run config's [model])"


def _peft_base_folder(path: Path, base: str | Path | None) -> Path:
    import json

    if base is None:
        try:
            base = json.loads((path / PEFT_CONFIG_FILE).read_text()).get("base_model_name_or_path") or None
        except ValueError as e:
            raise ModelLoadError(f"{path / PEFT_CONFIG_FILE}: not a PEFT adapter config ({e})") from None
        if base is None:
            raise ModelLoadError(f"{path}: the PEFT adapter does not name its base model; {_GIVE_BASE}")
        candidates = [Path(base), path / base]
    else:
        candidates = [Path(base)]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise ModelLoadError(f"{path}: the base model {str(base)!r} of this PEFT adapter is not a local folder; {_GIVE_BASE}")


def _load_peft(path: Path, device: str, target: torch.dtype | None, base: str | Path | None, track: str) -> ModelAdapter:
    from peft import PeftModel

    if not (path / PEFT_WEIGHTS_FILE).is_file():
        found = sorted(p.name for p in path.glob("adapter_model.*")) or ["no weights"]
        raise ModelLoadError(f"{path}: no {PEFT_WEIGHTS_FILE} ({', '.join(found)}); pickled weights are refused")
    base_folder = _peft_base_folder(path, base)
    tokenizer = _load_tokenizer(path if any(path.glob("tokenizer*")) else base_folder)
    model = _load_hf_model(base_folder, target)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False, local_files_only=True)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: the PEFT adapter does not fit the base model {base_folder} ({first})") from None
    return _adapter(path, partial(HFCausalLMAdapter, track=track), model.to(device).eval(), tokenizer)


def checkpointed_weights(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """A copy of the weights a training checkpoint can change: a PEFT model's adapter weights (``lora_*``), else
    every weight."""
    state = adapter.model.state_dict()
    if any(_is_adapter_weight(k) for k in state):
        state = {k: v for k, v in state.items() if _is_adapter_weight(k)}
    return {k: v.detach().clone() for k, v in state.items()}


def _is_adapter_weight(name: str) -> bool:
    return "lora_" in name


def load_checkpoint(adapter: ModelAdapter, checkpoint) -> None:
    """Load the weights of one training checkpoint into ``adapter``'s model, in place: a mapping of tensors keyed as
    its ``state_dict``, a safetensors file of them, or a folder written by :func:`save_model` / ``save_pretrained``
    (a model folder, or a PEFT adapter folder, whose ``adapter_model.safetensors`` holds the adapter's weights
    only). Weights the checkpoint lacks keep their values (a LoRA checkpoint leaves the frozen base alone); a PEFT
    model's checkpoint may hold its adapter weights only. A weight the model does not have, a shape that differs or
    a base weight of a PEFT model is a :class:`ModelLoadError` naming the checkpoint, raised before anything is
    loaded."""
    from ..fileio import load_tensors

    if isinstance(checkpoint, Mapping):
        where, state = "checkpoint mapping", dict(checkpoint)
    else:
        path = Path(checkpoint)
        if (path / PEFT_WEIGHTS_FILE).is_file():
            return _load_peft_checkpoint(adapter, path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
        if not files:
            raise ModelLoadError(f"{path}: not a checkpoint (neither a safetensors file nor a folder with safetensors "
                                 "weights)")
        where, state = str(path), {k: v for f in files for k, v in load_tensors(f, error=ModelLoadError).items()}
    own = adapter.model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ModelLoadError(f"{where}: {len(unknown)} weights the model does not have, e.g. {unknown[0]!r}")
    if any(_is_adapter_weight(k) for k in own):
        frozen = sorted(k for k in state if not _is_adapter_weight(k))
        if frozen:
            raise ModelLoadError(f"{where}: a checkpoint of a PEFT model may hold its adapter weights only (lora_*), got "
                                 f"{frozen[0]!r}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelLoadError(f"{where}: weight {k!r} has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}")
    adapter.model.load_state_dict(state, strict=False)


def _load_peft_checkpoint(adapter: ModelAdapter, path: Path) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    from ..fileio import load_tensors

    if not isinstance(adapter.model, PeftModel):
        raise ModelLoadError(f"{path}: a PEFT adapter checkpoint, but the model is not a PEFT model")
    state = load_tensors(path / PEFT_WEIGHTS_FILE, error=ModelLoadError)
    saved = checkpointed_weights(adapter)  # restored on error
    try:
        unexpected = set_peft_model_state_dict(adapter.model, state).unexpected_keys
        problem = f"{len(unexpected)} weights the model does not have, e.g. {unexpected[0]!r}" if unexpected else None
    except RuntimeError as e:
        problem = f"the adapter checkpoint does not fit the model ({str(e).strip().splitlines()[0]})"
    if problem:
        adapter.model.load_state_dict(saved, strict=False)
        raise ModelLoadError(f"{path}: {problem}")
