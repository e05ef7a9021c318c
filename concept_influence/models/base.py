"""Model adapters: one small interface over TransformerLens and Hugging Face causal LMs.

Everything downstream (activations, probes, curvature, scoring) talks to a :class:`ModelAdapter`:

* ``per_example_loss(batch)`` — mean cross-entropy over each example's response tokens, shape ``[B]``;
* ``activations(batch, hook_name)`` — the residual stream (or any hook) ``[B, T, d]``, stopping the
  forward after the hook's block;
* ``linear_maps(max_block, select)`` — every weight matrix (or those a :class:`~.selection.MapSelection` keeps) as a
  :class:`LinearMap` ``(d_out, d_in)`` with the modules whose output is its input and its output; ``capture(maps)``
  records both (inputs on the forward, output gradients on the backward) so that ``Σ_t g_t a_tᵀ`` is the gradient;
* ``n_blocks``, ``d_model``, ``dtype``, ``hook_names()``, ``fingerprint()``.

Models compute in their own dtype (:data:`MODEL_DTYPES`: float32, bfloat16 or float16): activations and output
gradients stay in it through the forward and backward; everything that is summed or multiplied into a result
(losses, covariances, eigenvalue corrections, queries, scores) is computed in float32 by its consumer.

Hook names follow TransformerLens (``blocks.{l}.hook_resid_post``) for both kinds of model. Biases are
not tracked as linear maps (curvature and scores cover weight matrices only).

This module holds the interface and what the adapters share; the adapters are in :mod:`.hooked_transformer` and
:mod:`.hugging_face`, wrapping, saving and loading models in :mod:`.loading`.
"""

from __future__ import annotations

import difflib
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from probes.hooks import block_of_hook

from ..data import Batch, TokenizedExample, collate
from ..errors import ConceptInfluenceError
from .selection import MapSelection, checked_selection, map_kind, selected_maps

__all__ = [
    "MODEL_DTYPES",
    "resolve_dtype",
    "HookError",
    "LinearMap",
    "Capture",
    "ModelAdapter",
    "block_of_hook",
    "per_token_mean_loss",
]

#: The dtypes a model may compute in, by torch's names (no aliases such as "bf16": one spelling per dtype, so
#: configs and saved settings compare equal).
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What ``dtype=None`` / ``"auto"`` means where a model is loaded: keep the dtype it was saved in.
AUTO_DTYPE = "auto"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype a model should be converted to: ``None`` or ``"auto"`` keep the model's own, else one of
    :data:`MODEL_DTYPES` by name or as a ``torch.dtype``. Anything else is a ``ValueError`` naming the accepted values."""
    if dtype is None or dtype == AUTO_DTYPE:
        return None
    if isinstance(dtype, torch.dtype) and dtype in MODEL_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in MODEL_DTYPES:
        return MODEL_DTYPES[dtype]
    shown = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else repr(dtype)
    raise ValueError(f"unsupported model dtype {shown}; expected one of {AUTO_DTYPE}, {', '.join(MODEL_DTYPES)}")



class HookError(ConceptInfluenceError, KeyError):
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

    @property
    def kind(self) -> str | None:
        """``"attention"``, ``"mlp"`` or None, from the name (:func:`~.selection.map_kind`)."""
        return map_kind(self.name)

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
    #: The maps :meth:`linear_maps` keeps by default (None: all); set with :meth:`select`.
    selection: MapSelection | None = None

    # ---- implemented by subclasses -------------------------------------------------------------
    def logits(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def hook_names(self) -> list[str]:
        raise NotImplementedError

    def _run_to_hook(self, batch: Batch, hook_name: str, stop_early: bool) -> torch.Tensor:
        raise NotImplementedError

    def _linear_maps(self, max_block: int | None = None) -> list[LinearMap]:
        """Every weight matrix of blocks ``0..max_block`` (None: all), in block order."""
        raise NotImplementedError

    def _edit_hook(self, hook_name: str, edit: Callable[[torch.Tensor], torch.Tensor]):
        """A context manager that applies ``edit`` at ``hook_name`` (see :meth:`edit_activation`)."""
        raise NotImplementedError

    def extend(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        """Feed ``tokens`` ``[B, t]`` (no padding) after what ``cache`` holds; returns the next-token
        logits ``[B, V]`` at the last position and the updated key-value cache (for generation)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------
    def linear_maps(self, max_block: int | None = None,
                    select: MapSelection | dict | str | None = None) -> list[LinearMap]:
        """The weight matrices of blocks ``0..max_block`` (None: all) that ``select`` keeps, by default the adapter's
        :attr:`selection` (see :func:`~.selection.selected_maps`)."""
        return selected_maps(self, max_block, self.selection if select is None else select)

    def select(self, selection: MapSelection | dict | str | None) -> "ModelAdapter":
        """Track only the maps ``selection`` keeps from now on (None: every map), checked at once; returns ``self``."""
        self.selection = checked_selection(self, selection)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tracked weight matrices: the forward and backward compute in it."""
        return self._linear_maps(0)[0].weight.dtype

    def check_dtype(self) -> None:
        """Raise ``ValueError`` naming the first tracked weight whose dtype is not one of :data:`MODEL_DTYPES`
        (float64, or int8 / 4-bit quantised weights, through which no gradient can be captured)."""
        for m in self._linear_maps():
            if m.weight.dtype not in MODEL_DTYPES.values():
                raise ValueError(f"weight {m.name} is {str(m.weight.dtype).removeprefix('torch.')}; supported model "
                                 f"dtypes: {', '.join(MODEL_DTYPES)} (load_model(..., dtype=...) converts a float model)")

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

    def hook_width(self, hook_name: str) -> int:
        """The width ``d`` of the activations ``[B, T, d]`` at ``hook_name`` (``d_model`` for the residual stream,
        ``d_mlp`` for ``mlp.hook_post``), read once from a two-token forward."""
        self.check_hook(hook_name)
        widths = self.__dict__.setdefault("_hook_widths", {})
        if hook_name not in widths:
            probe = collate([TokenizedExample("width", (self.pad_token_id,) * 2, 1)], self.pad_token_id)
            with torch.no_grad():
                act = self._run_to_hook(probe.to(self.device), hook_name, stop_early=True)
            if act.dim() != 3:
                raise HookError(f"hook {hook_name!r} gives activations of shape {tuple(act.shape)}; concepts read hooks "
                                "of shape [batch, tokens, width]")
            widths[hook_name] = int(act.shape[-1])
        return widths[hook_name]

    @contextmanager
    def edit_activation(self, hook_name: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """While active, every forward replaces the activation ``[B, T, d]`` at ``hook_name`` with ``edit(act)``
        (e.g. steering: ``lambda act: act + alpha * v``); later blocks see the edited value."""
        self.check_hook(hook_name)
        with self._edit_hook(hook_name, edit):
            yield

    @contextmanager
    def tracking(self, maps: Sequence[LinearMap]) -> Iterator[None]:
        """Eval mode (no dropout) with gradients enabled and the maps' weights requiring grad (frozen ones, such as
        the base weights of a LoRA fine-tune, only while the context is open); the model's state is restored after."""
        model = self.model
        was_training = model.training
        frozen = [m.weight for m in maps if not m.weight.requires_grad]
        model.eval()
        for w in frozen:
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                yield
        finally:
            for w in frozen:
                w.requires_grad_(False)
            model.train(was_training)

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
