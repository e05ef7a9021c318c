"""The Hugging Face adapter: a causal LM (GPT-2, Llama, Qwen2, ...) behind the :class:`~.base.ModelAdapter` interface."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..data import Batch
from .base import LinearMap, ModelAdapter, _StopForward, block_of_hook
from .selection import MAP_KINDS, MapSelection, MapSelectionError

__all__ = ["HFCausalLMAdapter", "TRACK_CHOICES", "parse_track"]


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


_ATTENTION = ("self_attn", "attn", "attention")
_MLP = ("mlp",)
_MLP_DOWN = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _hook_points(block: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """A block's hook points, in TransformerLens names, as (module, "input" | "output"): the residual stream before
    and after the block, the attention and MLP outputs (width d_model), and ``mlp.hook_post``, the MLP's hidden
    activation that its down projection reads (width d_mlp). Points a block lacks are left out."""
    points = {"hook_resid_pre": (block, "input"), "hook_resid_post": (block, "output")}
    attn, mlp = _child(block, _ATTENTION), _child(block, _MLP)
    if attn is not None:
        points["hook_attn_out"] = (attn, "output")
    if mlp is not None:
        points["hook_mlp_out"] = (mlp, "output")
        down = _child(mlp, _MLP_DOWN)
        if down is not None:
            points["mlp.hook_post"] = (down, "input")
    return points


def _linear_layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D: x @ W + b
        return "in_out"
    return None


TRACK_CHOICES = ("auto", "lora", "full")


def parse_track(track: str | dict) -> tuple[str, MapSelection]:
    """A run config's ``[model] track``: ``"auto"``, ``"lora"`` or ``"full"`` (the weights of a LoRA fine-tune), a kind
    (``"attention"``, ``"mlp"``), or a table ``{weights, kinds, names, blocks}``; returned as ``(weights, selection)``.
    A bad value is a ``ValueError`` naming the key."""
    if isinstance(track, str):
        if track in TRACK_CHOICES:
            return track, MapSelection()
        if track in MAP_KINDS:
            return "auto", MapSelection(kinds=(track,))
        raise ValueError(f"track must be one of {', '.join(TRACK_CHOICES + MAP_KINDS)} or a table of weights, kinds, "
                         f"names and blocks; got {track!r}")
    weights = track.get("weights", "auto")
    if weights not in TRACK_CHOICES:
        raise ValueError(f"track.weights must be one of {', '.join(TRACK_CHOICES)}; got {weights!r}")
    try:
        return weights, MapSelection.parse({k: v for k, v in track.items() if k != "weights"})
    except MapSelectionError as e:
        raise ValueError(f"track: {e}") from None


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

    Our own forward hooks give TransformerLens-style hook names: ``blocks.{l}.hook_resid_pre`` (block input),
    ``blocks.{l}.hook_resid_post`` (block output, before any final norm), ``blocks.{l}.hook_attn_out`` and
    ``blocks.{l}.hook_mlp_out`` (what attention and the MLP add to the residual stream), and
    ``blocks.{l}.mlp.hook_post`` (the MLP's hidden activation, width d_mlp). Linear maps are the ``nn.Linear``
    (and GPT-2 ``Conv1D``) modules inside the blocks, named ``blocks.{l}.<module path>``; embeddings and the LM head
    are not tracked.

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
        self._points = [_hook_points(block) for block in self.blocks]  # per block, found once
        self._lora = [_lora_layers(block) for block in self.blocks]
        has_lora = any(self._lora)
        if track == "lora" and not has_lora:
            raise ValueError("track='lora' but the model has no LoRA adapters (a PEFT PeftModel is expected)")
        self.track = ("lora" if has_lora else "full") if track == "auto" else track
        if self.track == "lora":
            for layers in self._lora:
                for name, layer in layers.items():
                    _check_lora_layer(name, layer)
        self.n_blocks = len(self.blocks)
        self.d_model = model.config.hidden_size
        cfg = model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.check_dtype()

    def logits(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits

    def hook_names(self) -> list[str]:
        return [f"blocks.{l}.{point}" for l, points in enumerate(self._points) for point in points]

    def _hook_point(self, hook_name: str) -> tuple[nn.Module, str]:
        return self._points[block_of_hook(hook_name)][hook_name.split(".", 2)[2]]

    def _run_to_hook(self, batch: Batch, hook_name: str, stop_early: bool) -> torch.Tensor:
        store = {}

        def keep(act):
            store["act"] = act
            if stop_early:  # all we need: stop before the rest of the model runs
                raise _StopForward
            return act

        try:
            with self._edit_hook(hook_name, keep):
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _StopForward:
            pass
        return store["act"]

    @contextmanager
    def _edit_hook(self, hook_name, edit):
        module, where = self._hook_point(hook_name)

        def edit_input(module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        def edit_output(module, args, output):
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        if where == "input":
            handle = module.register_forward_pre_hook(edit_input, with_kwargs=True)
        else:
            handle = module.register_forward_hook(edit_output)
        try:
            yield
        finally:
            handle.remove()

    def extend(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        out = self.model(input_ids=tokens.to(self.device), past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def _linear_maps(self, max_block: int | None = None) -> list[LinearMap]:
        last = self.n_blocks - 1 if max_block is None else min(max_block, self.n_blocks - 1)
        maps = []
        for l in range(last + 1):
            for name, mod in self._tracked_modules(self.blocks[l], self._lora[l]):
                maps.append(LinearMap(f"blocks.{l}.{name}", l, mod.weight, _linear_layout(mod), mod, mod, input_from="input"))
        return maps

    def _tracked_modules(self, block: nn.Module, lora: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
        if self.track == "lora":
            for name, layer in lora.items():
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
