"""Model adapters: one small interface over TransformerLens and Hugging Face causal LMs.

Everything downstream (activations, probes, curvature, scoring) talks to a :class:`ModelAdapter`:

* ``per_example_loss(batch)`` — mean cross-entropy over each example's response tokens, shape ``[B]``;
* ``activations(batch, hook_name)`` — the residual stream (or any hook) ``[B, T, d]``, stopping the
  forward after the hook's block;
* ``linear_maps(max_block)`` — every weight matrix as a :class:`LinearMap` ``(d_out, d_in)`` with the
  modules whose output is its input activation and its output; ``capture(maps)`` records both
  (inputs on the forward, output gradients on the backward) so that ``Σ_t g_t a_tᵀ`` is the gradient;
* ``n_blocks``, ``d_model``, ``hook_names()``, ``fingerprint()``.

Hook names follow TransformerLens (``blocks.{l}.hook_resid_post``) for both kinds of model. Biases are
not tracked as linear maps (curvature and scores cover weight matrices only).
"""

from __future__ import annotations

import difflib
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from probes.hooks import block_of_hook

from .data import Batch

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

class HookError(KeyError):
    """Unknown hook name or layer; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# Weight layouts, as stored in the parameter, mapped to the matrix convention (d_out, d_in).
_LAYOUTS = {
    "out_in": (lambda w: w, lambda m, shape: m),  # nn.Linear
    "in_out": (lambda w: w.T, lambda m, shape: m.T),  # Conv1D, TransformerLens W_in / W_out
    # TransformerLens W_Q/W_K/W_V: [heads, d_model, d_head] -> rows (head, d_head), columns d_model
    "heads_in_dh": (
        lambda w: w.permute(0, 2, 1).reshape(w.shape[0] * w.shape[2], w.shape[1]),
        lambda m, shape: m.reshape(shape[0], shape[2], shape[1]).permute(0, 2, 1),
    ),
    # TransformerLens W_O: [heads, d_head, d_model] -> rows d_model, columns (head, d_head)
    "heads_dh_out": (
        lambda w: w.reshape(w.shape[0] * w.shape[1], w.shape[2]).T,
        lambda m, shape: m.T.reshape(shape),
    ),
}


@dataclass(eq=False)
class LinearMap:
    """A weight matrix ``W`` with ``out_t = W a_t (+ b)`` at every token.

    ``input_module``'s output (or its first input when ``input_from == "input"``) is ``a``;
    ``output_module``'s output is ``out``. Both are flattened to ``[B, T, d]``.
    """

    name: str
    block: int
    weight: nn.Parameter
    layout: str
    input_module: nn.Module
    output_module: nn.Module
    input_from: str = "output"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.to_matrix(self.weight).shape)  # type: ignore[return-value]

    def to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor (weight or its gradient) as a ``(d_out, d_in)`` matrix."""
        return _LAYOUTS[self.layout][0](tensor)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """A ``(d_out, d_in)`` matrix back in the parameter's shape."""
        return _LAYOUTS[self.layout][1](matrix, tuple(self.weight.shape)).contiguous()


@dataclass
class Capture:
    """Per-map activations recorded during a forward and output gradients during the backward."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # in the graph, while the context is open


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


class _StopForward(Exception):
    pass


class ModelAdapter:
    """Common interface. Subclasses set ``model``, ``tokenizer``, ``n_blocks``, ``d_model``."""

    model: nn.Module
    tokenizer: object
    n_blocks: int
    d_model: int
    context_length: int | None  # longest sequence the model accepts (None: unbounded)

    # ---- implemented by subclasses -------------------------------------------------------------
    def logits(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def hook_names(self) -> list[str]:
        raise NotImplementedError

    def _run_to_hook(self, batch: Batch, hook_name: str, stop_early: bool) -> torch.Tensor:
        raise NotImplementedError

    def linear_maps(self, max_block: int | None = None) -> list[LinearMap]:
        raise NotImplementedError

    def extend(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        """Feed ``tokens`` ``[B, t]`` (no padding) after what ``cache`` holds; returns the next-token
        logits ``[B, V]`` at the last position and the updated key-value cache (for generation)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def check_hook(self, hook_name: str) -> int | None:
        """Validate a hook name; returns its block. Raises :class:`HookError` listing close matches."""
        names = self.hook_names()
        if hook_name in names:
            return block_of_hook(hook_name)
        block = block_of_hook(hook_name)
        if block is not None and not 0 <= block < self.n_blocks:
            raise HookError(f"layer {block} in hook {hook_name!r} is out of range: the model has blocks 0..{self.n_blocks - 1}")
        close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise HookError(f"unknown hook name {hook_name!r} for {type(self).__name__}{hint}")

    def per_example_loss(self, batch: Batch, tokens: str = "response") -> torch.Tensor:
        """Mean next-token cross-entropy per example over its response tokens (``tokens="response"``)
        or over every real token after the first (``tokens="all"``). Shape ``[B]``."""
        batch = batch.to(self.device)
        return per_token_mean_loss(self.logits(batch), batch, tokens)

    def activations(self, batch: Batch, hook_name: str, stop_early: bool = True) -> torch.Tensor:
        """Activations ``[B, T, d]`` at ``hook_name``; the forward stops after the hook's block when
        ``stop_early``. The result stays in the autograd graph unless called under ``torch.no_grad``."""
        self.check_hook(hook_name)
        return self._run_to_hook(batch.to(self.device), hook_name, stop_early)

    @contextmanager
    def capture(self, maps: Sequence[LinearMap]) -> Iterator[Capture]:
        """Record each map's input ``a`` ``[B, T, d_in]`` and output tensor on the forward, and the gradient
        of its output ``g`` ``[B, T, d_out]`` on the backward. Maps that receive no gradient have no
        ``output_grads`` entry. Differentiating w.r.t. ``cap.outputs`` (rather than the weights) gives every
        ``g`` without computing the weight gradients."""
        cap = Capture()
        handles = []

        def save_input(name: str, source: str) -> Callable:
            def hook(module, args, output):
                x = output if source == "output" else args[0]
                cap.inputs[name] = _flat(x.detach())

            return hook

        def save_grad(name: str) -> Callable:
            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                if out.requires_grad:
                    cap.outputs[name] = out
                    out.register_hook(lambda g: cap.output_grads.__setitem__(name, _flat(g.detach())))

            return hook

        try:
            for m in maps:
                handles.append(m.input_module.register_forward_hook(save_input(m.name, m.input_from)))
                handles.append(m.output_module.register_forward_hook(save_grad(m.name)))
            yield cap
        finally:
            for h in handles:
                h.remove()
            # The outputs' gradient hooks refer to `cap`; dropping `cap`'s references to the outputs breaks a
            # cycle through autograd's C++ hook storage that Python's collector cannot see (it leaked graphs).
            cap.outputs.clear()

    def fingerprint(self) -> str:
        """A short hash of the architecture and weights (names, shapes, and a sample of values)."""
        h = hashlib.sha256(type(self.model).__name__.encode())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                flat = p.detach().reshape(-1).float()
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
                stats = torch.stack([flat.sum(), flat.square().sum()]).cpu()
                h.update(stats.numpy().tobytes())
                h.update(flat[:: max(1, flat.numel() // 64)][:64].cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def per_token_mean_loss(
    logits: torch.Tensor, batch: Batch, tokens: str = "response", targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example mean cross-entropy of ``logits`` for the batch's next tokens (see ``per_example_loss``).

    ``targets`` ``[B, T-1]`` replaces the next tokens ``input_ids[:, 1:]`` as labels (e.g. labels sampled
    from the model for the true Fisher); the token mask and normalisation are unchanged."""
    if tokens == "response":
        mask = batch.response_mask[:, 1:]
    elif tokens == "all":
        mask = batch.attention_mask[:, 1:].bool()
    else:
        raise ValueError(f"tokens must be 'response' or 'all', got {tokens!r}")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch.input_ids[:, 1:] if targets is None else targets
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1)


class HookedTransformerAdapter(ModelAdapter):
    """Adapter for a TransformerLens ``HookedTransformer``.

    Linear maps per block (TransformerLens 3.x names): ``attn.W_Q/W_K/W_V`` (input: the ``ln1`` module's
    output, which includes the LayerNorm affine; output ``attn.hook_q/k/v``), ``attn.W_O`` (input
    ``attn.hook_z``, output ``hook_attn_out``), ``mlp.W_in`` (input: ``ln2`` output, output
    ``mlp.hook_pre``), ``mlp.W_out`` (input ``mlp.hook_post``, output ``hook_mlp_out``).
    Right-padded batches are run without an attention mask: in a causal model padding at the end does not
    change any real token.
    """

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.n_blocks = model.cfg.n_layers
        self.d_model = model.cfg.d_model
        self.context_length = model.cfg.n_ctx
        if model.cfg.use_split_qkv_input or model.cfg.use_attn_in:
            raise ValueError("use_split_qkv_input / use_attn_in are not supported: W_Q/W_K/W_V inputs differ per head")

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.to(self.device).input_ids, return_type="logits")

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def _run_to_hook(self, batch: Batch, hook_name: str, stop_early: bool) -> torch.Tensor:
        store = {}

        def keep(act, hook):
            store["act"] = act

        block = block_of_hook(hook_name)
        stop = block + 1 if (stop_early and block is not None) else None
        self.model.run_with_hooks(batch.input_ids, fwd_hooks=[(hook_name, keep)], stop_at_layer=stop, return_type=None)
        return store["act"]

    def extend(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        try:  # TransformerLens 3.x
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as KVCache
        except ImportError:  # TransformerLens 2.x
            from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as KVCache

        if cache is None:
            cache = KVCache.init_cache(self.model.cfg, self.device, tokens.shape[0])
        return self.model(tokens.to(self.device), past_kv_cache=cache, return_type="logits")[:, -1], cache

    def linear_maps(self, max_block: int | None = None) -> list[LinearMap]:
        last = self.n_blocks - 1 if max_block is None else min(max_block, self.n_blocks - 1)
        maps = []
        for l in range(last + 1):
            blk = self.model.blocks[l]
            attn = blk.attn
            for w, out in (("W_Q", attn.hook_q), ("W_K", attn.hook_k), ("W_V", attn.hook_v)):
                maps.append(LinearMap(f"blocks.{l}.attn.{w}", l, getattr(attn, w), "heads_in_dh", blk.ln1, out))
            maps.append(LinearMap(f"blocks.{l}.attn.W_O", l, attn.W_O, "heads_dh_out", attn.hook_z, blk.hook_attn_out))
            if getattr(blk, "mlp", None) is not None and hasattr(blk.mlp, "W_in"):
                mlp = blk.mlp
                maps.append(LinearMap(f"blocks.{l}.mlp.W_in", l, mlp.W_in, "in_out", blk.ln2, mlp.hook_pre))
                maps.append(LinearMap(f"blocks.{l}.mlp.W_out", l, mlp.W_out, "in_out", mlp.hook_post, blk.hook_mlp_out))
        return maps


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

    from .fileio import atomic_write_text, save_tensors

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


def load_model(path: str | Path, device: str = "cpu") -> ModelAdapter:
    """Load a model folder written by :func:`save_model` or by Hugging Face ``save_pretrained`` (with its
    tokenizer), offline and from safetensors only (pickled ``.bin`` weights are refused)."""
    import json

    from .fileio import load_tensors

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
            cfg["dtype"] = getattr(torch, cfg.get("dtype") or "float32")
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
        return HookedTransformerAdapter(model.to(device).eval(), tokenizer)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: neither {TL_CONFIG_FILE} (TransformerLens) nor config.json (Hugging Face) found")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weights"]
        raise ModelLoadError(f"{path}: no safetensors weights ({', '.join(found)}); pickled weights are refused")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load the Hugging Face model ({e})") from None
    return HFCausalLMAdapter(model.to(device).eval(), tokenizer)
