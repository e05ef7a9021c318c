"""The Hugging Face adapter: a causal LM (GPT-2, Llama, Qwen2, ...) behind the :class:`~.base.ModelAdapter` interface."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..data import Batch
from .base import LinearMap, ModelAdapter, _StopForward, block_of_hook

__all__ = ["HFCausalLMAdapter"]


def _find_blocks(model: nn.Module) -> nn.ModuleList:
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def _linear_layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D: x @ W + b
        return "in_out"
    return None


class HFCausalLMAdapter(ModelAdapter):
    """Adapter for a Hugging Face causal LM (GPT-2, Llama, Qwen2, Mistral, GPT-NeoX, ...).

    Our own forward hooks on the decoder blocks give TransformerLens-style residual hook names
    (``blocks.{l}.hook_resid_pre`` = block input, ``blocks.{l}.hook_resid_post`` = block output, before
    any final norm). Linear maps are the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules inside the blocks,
    named ``blocks.{l}.<module path>``; embeddings and the LM head are not tracked.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = _find_blocks(model)
        self.n_blocks = len(self.blocks)
        self.d_model = model.config.hidden_size
        cfg = model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.check_dtype()

    def logits(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def hook_names(self) -> list[str]:
        return [f"blocks.{l}.{h}" for l in range(self.n_blocks) for h in ("hook_resid_pre", "hook_resid_post")]

    def _run_to_hook(self, batch: Batch, hook_name: str, stop_early: bool) -> torch.Tensor:
        block = self.blocks[block_of_hook(hook_name)]
        store = {}

        def keep_pre(module, args, kwargs):
            store["act"] = args[0] if args else kwargs["hidden_states"]
            if stop_early:  # the block's input is all we need: stop before running it
                raise _StopForward

        def keep_post(module, args, output):
            store["act"] = output[0] if isinstance(output, tuple) else output
            if stop_early:
                raise _StopForward

        if hook_name.endswith("hook_resid_pre"):
            handle = block.register_forward_pre_hook(keep_pre, with_kwargs=True)
        else:
            handle = block.register_forward_hook(keep_post)
        try:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return store["act"]

    @contextmanager
    def _edit_hook(self, hook_name, edit):
        block = self.blocks[block_of_hook(hook_name)]

        def edit_pre(module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        def edit_post(module, args, output):
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        if hook_name.endswith("hook_resid_pre"):
            handle = block.register_forward_pre_hook(edit_pre, with_kwargs=True)
        else:
            handle = block.register_forward_hook(edit_post)
        try:
            yield
        finally:
            handle.remove()

    def extend(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        out = self.model(input_ids=tokens.to(self.device), past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def linear_maps(self, max_block: int | None = None) -> list[LinearMap]:
        last = self.n_blocks - 1 if max_block is None else min(max_block, self.n_blocks - 1)
        maps = []
        for l in range(last + 1):
            for name, mod in self.blocks[l].named_modules():
                layout = _linear_layout(mod)
                if layout is not None:
                    maps.append(LinearMap(f"blocks.{l}.{name}", l, mod.weight, layout, mod, mod, input_from="input"))
        return maps
