"""Model adapters: one small interface over TransformerLens and Hugging Face causal LMs (see :mod:`.base`)."""

from .base import (
    MODEL_DTYPES,
    Capture,
    HookError,
    LinearMap,
    ModelAdapter,
    block_of_hook,
    per_token_mean_loss,
    resolve_dtype,
)
from .hooked_transformer import HookedTransformerAdapter
from .hugging_face import HFCausalLMAdapter
from .loading import ModelLoadError, as_adapter, checkpointed_weights, load_checkpoint, load_model, save_model
from .selection import MAP_KINDS, MapSelection, MapSelectionError, map_kind

__all__ = [
    "MODEL_DTYPES",
    "resolve_dtype",
    "HookError",
    "LinearMap",
    "MapSelection",
    "MapSelectionError",
    "MAP_KINDS",
    "map_kind",
    "Capture",
    "ModelAdapter",
    "HookedTransformerAdapter",
    "HFCausalLMAdapter",
    "as_adapter",
    "ModelLoadError",
    "save_model",
    "load_model",
    "load_checkpoint",
    "checkpointed_weights",
    "block_of_hook",
    "per_token_mean_loss",
]
