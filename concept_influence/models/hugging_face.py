"""The Hugging Face adapter: a causal LM (GPT-2, Llama, Qwen2, ...) behind the :class:`~.base.ModelAdapter` interface."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..data import Batch
from .base import LinearMap, ModelAdapter, _StopForward, block_of_hook

__all__ = ["HFCausalLMAdapter", "TRACK_CHOICES"]


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


TRACK_CHOICES = ("auto", "lora", "full")


def _lora_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of a block by module path (empty for a model without adapters)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency, but a model without adapters needs none of it
        return {}
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, LoraLayer)}


def _check_lora_layer(name: str, layer: nn.Module) -> None:
    """Refuse LoRA variants whose factors do not act as two plain linear maps on the layer's input."""
    if getattr(layer, "merged", False):
        raise ValueError(f"{name}: the LoRA adapter is merged into the base weights; unmerge it (model.unmerge_adapter()) "
                         "to track its factors, or track='full'")
    for adapter_name in layer.active_adapters:
        if getattr(layer, "use_dora", {}).get(adapter_name, False):
            raise ValueError(f"{name}: DoRA adapters are not supported (their factors are not plain linear maps); "
                             "use track='full'")
        if adapter_name in layer.lora_A and not isinstance(layer.lora_A[adapter_name], nn.Linear):
            raise ValueError(f"{name}: only LoRA on linear layers is supported, not {type(layer.lora_A[adapter_name]).__name__}")


class HFCausalLMAdapter(ModelAdapter):
    """Adapter for a Hugging Face causal LM (GPT-2, Llama, Qwen2, Mistral, GPT-NeoX, ...), also with PEFT LoRA adapters.

    Our own forward hooks on the decoder blocks give TransformerLens-style residual hook names
    (``blocks.{l}.hook_resid_pre`` = block input, ``blocks.{l}.hook_resid_post`` = block output, before
    any final norm). Linear maps are the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules inside the blocks,
    named ``blocks.{l}.<module path>``; embeddings and the LM head are not tracked.

    ``track`` chooses the maps of a model with LoRA adapters (a PEFT ``PeftModel``): ``"lora"`` tracks the factors
    ``lora_A`` (r × d_in) and ``lora_B`` (d_out × r) of every active adapter — what the fine-tune changed;
    ``"full"`` tracks the full weight matrices (the frozen base weights; their gradient is the gradient with respect
    to the adapted weight W + s·BA). ``"auto"`` (the default) is ``"lora"`` when the model has LoRA layers and
    ``"full"`` otherwise.
    """

    def __init__(self, model, tokenizer, track: str = "auto"):
        if track not in TRACK_CHOICES:
            raise ValueError(f"track must be one of {', '.join(TRACK_CHOICES)}, got {track!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = _find_blocks(model)
        has_lora = any(_lora_layers(block) for block in self.blocks)
        if track == "lora" and not has_lora:
            raise ValueError("track='lora' but the model has no LoRA adapters (a PEFT PeftModel is expected)")
        self.track = ("lora" if has_lora else "full") if track == "auto" else track
        self.n_blocks = len(self.blocks)
        self.d_model = model.config.hidden_size
        cfg = model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

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
            lora = _lora_layers(self.blocks[l])
            for name, mod in self._tracked_modules(self.blocks[l], lora):
                maps.append(LinearMap(f"blocks.{l}.{name}", l, mod.weight, _linear_layout(mod), mod, mod, input_from="input"))
        return maps

    def _tracked_modules(self, block: nn.Module, lora: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
        if self.track == "lora":
            for name, layer in lora.items():
                _check_lora_layer(name, layer)
                for adapter_name in layer.active_adapters:
                    if adapter_name in layer.lora_A:
                        yield f"{name}.lora_A.{adapter_name}", layer.lora_A[adapter_name]
                        yield f"{name}.lora_B.{adapter_name}", layer.lora_B[adapter_name]
            return
        inside_lora = tuple(f"{name}." for name in lora)
        for name, mod in block.named_modules():
            if _linear_layout(mod) is None:
                continue
            if name.startswith(inside_lora) and not name.endswith(".base_layer"):  # the factors themselves
                continue
            yield name, mod
