"""Model adapters: one small interface over TransformerLens and Hugging Face causal LMs (see :mod:`.base`)."""

from .base import (Capture, HFCausalLMAdapter, HookedTransformerAdapter, HookError, LinearMap, ModelAdapter,
                   ModelLoadError, as_adapter, block_of_hook, load_model, per_token_mean_loss, save_model)

__all__ = [
    "HookError",
    "LinearMap",
    "Capture",
    "ModelAdapter",
    "HookedTransformerAdapter",
    "HFCausalLMAdapter",
    "as_adapter",
    "ModelLoadError",
    "save_model",
    "load_model",
    "block_of_hook",
]
