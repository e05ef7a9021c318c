"""Concept functions f(θ): what a concept measures on a set of evaluation examples.

f_k(θ) = mean over evaluation examples of (token reduction of readout_k(h_ℓ,t)), where the readout is
a projection on unit directions ``⟨v̂_k, h⟩`` (probe, difference of means, SAE decoder/encoder row) or a
nonlinear function such as an SAE latent's activation. K concepts at one hook are measured together.

The token reduction is the *query*: where the concept is read on the evaluation prompts. The default,
:data:`DEFAULT_QUERY` = ``last_prompt``, reads the activation at the last prompt token, before the model answers,
which carries what the model is about to do; the response tokens of a fixed text mostly re-encode that text
(benchmarks/query_study.md measures the choice). The fast path reads a *training example* elsewhere, on its own
response tokens (``ProbeProjection(reduction="response_mean")``): that is what training on it teaches.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from probes.activations import REDUCTIONS, reduce_tokens
from probes.directions import ConceptDirection, DirectionError

from .data import Batch, TokenizedExample, iter_batches
from .errors import ConceptInfluenceError
from .models import LinearMap, ModelAdapter, block_of_hook

__all__ = ["ConceptFunction", "ConceptError", "measurement_gradient", "project_tokens", "Projection",
           "check_direction_compatible", "DEFAULT_QUERY"]

DEFAULT_QUERY = "last_prompt"
PROMPT_REDUCTIONS = ("last_prompt", "prompt_mean")  # the queries that read no response token

#: A map's projection ``(P_out, P_in)``: ``[d_out, r_out]`` and ``[d_in, r_in]`` bases, None for no projection.
Projection = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


class ConceptError(ConceptInfluenceError, ValueError):
    """A concept cannot be measured as asked (no gradient reaches it, mismatched hooks, ...)."""


def check_direction_compatible(direction: ConceptDirection, adapter: ModelAdapter) -> None:
    """Raise :class:`~.models.HookError` for a hook the model lacks and
    :class:`~probes.directions.DirectionError` for a vector of the wrong size or a layer beyond the model's blocks."""
    width = adapter.hook_width(direction.hook_name)
    if direction.vector.numel() != width:
        raise DirectionError(
            f"direction at hook {direction.hook_name!r} has size {direction.vector.numel()}, "
            f"but the model's activations there have width {width}"
        )
    if direction.layer >= adapter.n_blocks:
        raise DirectionError(f"layer {direction.layer} is out of range: the model has blocks 0..{adapter.n_blocks - 1}")


class ConceptFunction:
    """K concept readouts at one hook, reduced over tokens (the query: ``last_prompt`` by default,
    ``response_mean``, ``prompt_mean`` or ``all_tokens``), averaged over ``eval_examples`` (what the behaviour
    looks like).

    ``readout`` maps activations ``[..., d_model]`` to ``[..., K]``; build one with
    :meth:`from_directions` or :meth:`from_sae_latents`.
    """

    def __init__(self, hook_name: str, readout: Callable[[torch.Tensor], torch.Tensor], names: Sequence[str],
                 reduction: str = DEFAULT_QUERY, width: int | None = None,
                 eval_examples: Sequence[TokenizedExample] | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        self.hook_name = hook_name
        self.layer = block_of_hook(hook_name)
        self.readout = readout
        self.names = list(names)
        self.reduction = reduction
        self.width = width
        self.eval_examples = list(eval_examples) if eval_examples is not None else None

    @classmethod
    def from_directions(cls, directions, eval_examples: Sequence[TokenizedExample] | None = None,
                        reduction: str = DEFAULT_QUERY) -> "ConceptFunction":
        """Projections on the unit vectors of one or more ``ConceptDirection`` at the same hook."""
        directions = [directions] if not isinstance(directions, (list, tuple)) else list(directions)
        hooks = {d.hook_name for d in directions}
        if len(hooks) != 1:
            raise ConceptError(f"directions must share one hook to be measured together, got {sorted(hooks)}")
        units = torch.stack([d.unit.float() for d in directions])
        names = [d.metadata.get("name", f"{d.kind}@{d.hook_name}") for d in directions]
        return cls(directions[0].hook_name, lambda h: h.float() @ units.to(h.device).T, names, reduction, units.shape[1],
                   eval_examples)

    @classmethod
    def from_sae_latents(cls, sae, latents: Sequence[int], eval_examples: Sequence[TokenizedExample] | None = None,
                         hook_name: str | None = None, reduction: str = DEFAULT_QUERY) -> "ConceptFunction":
        """The activations of SAE latents (a nonlinear concept), read with ``sae.encode``."""
        latents = list(latents)
        d_sae = sae.cfg.d_sae
        bad = [i for i in latents if not 0 <= i < d_sae]
        if bad:
            raise ConceptError(f"latent index {bad[0]} is out of range: the SAE has latents 0..{d_sae - 1}")
        hook = hook_name or sae.cfg.metadata.hook_name
        idx = torch.tensor(latents)
        return cls(hook, lambda h: sae.encode(h.float())[..., idx], [f"sae_latent_{i}" for i in latents], reduction,
                   sae.cfg.d_in, eval_examples)

    @property
    def k(self) -> int:
        return len(self.names)

    def check(self, adapter: ModelAdapter) -> None:
        """The hook exists in the model and the readout's width matches the activations there."""
        width = adapter.hook_width(self.hook_name)
        if self.width is not None and self.width != width:
            raise ConceptError(f"the concept at {self.hook_name} reads width {self.width}, the model's activations there "
                               f"have width {width}")

    def per_example(self, adapter: ModelAdapter, batch: Batch, reduction: str | None = None) -> torch.Tensor:
        """Each example's reduced readout ``[B, K]`` (in the autograd graph unless under no_grad), over the query's
        tokens or those of ``reduction``."""
        acts = adapter.activations(batch, self.hook_name)
        return reduce_tokens(self.readout(acts), batch.to(acts.device), reduction or self.reduction)

    def _examples(self, examples: Sequence[TokenizedExample] | None) -> Sequence[TokenizedExample]:
        """The evaluation examples (or ``examples``), cut after their first response token when the query reads prompt
        tokens only: a causal language model's activations there do not depend on later tokens, so those are not run
        (the first response token stays, marking where the prompt ends)."""
        examples = self.eval_examples if examples is None else examples
        if not examples:
            raise ConceptError(f"the concept at {self.hook_name} needs evaluation examples")
        if self.reduction not in PROMPT_REDUCTIONS:
            return examples
        return [e if e.n_response_tokens <= 1 else TokenizedExample(e.id, e.input_ids[:e.response_start + 1], e.response_start)
                for e in examples]

    @torch.no_grad()
    def evaluate(self, adapter: ModelAdapter, examples: Sequence[TokenizedExample] | None = None,
                 batch_size: int = 16) -> torch.Tensor:
        """f(θ): the mean readout over ``examples`` (default: the evaluation examples), shape ``[K]``."""
        self.check(adapter)
        examples = self._examples(examples)
        total = torch.zeros(self.k)
        for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
            total += self.per_example(adapter, batch).sum(0).cpu()
        return total / len(examples)

    def gradient(self, adapter: ModelAdapter, maps: Sequence[LinearMap], examples: Sequence[TokenizedExample] | None = None,
                 batch_size: int = 16, progress: bool = False,
                 projections: Mapping[str, Projection] | None = None) -> dict[str, torch.Tensor]:
        """∇θ f for each map as ``[K, d_out, d_in]`` matrices (exact autograd; default examples: the
        evaluation examples), or projected as :func:`measurement_gradient` says for maps in ``projections``.

        Raises :class:`ConceptError` when no tracked map receives gradient (e.g. a concept at
        ``blocks.0.hook_resid_pre``)."""
        self.check(adapter)
        return measurement_gradient(adapter, self._examples(examples), maps, lambda b: self.per_example(adapter, b), self.k,
                                    f"the concept at {self.hook_name}", batch_size, progress, projections)


def measurement_gradient(adapter: ModelAdapter, examples: Sequence[TokenizedExample], maps: Sequence[LinearMap],
                         per_example: Callable[[Batch], torch.Tensor], k: int, what: str, batch_size: int = 16,
                         progress: bool = False, projections: Mapping[str, Projection] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Gradient of the mean over ``examples`` of ``per_example(batch)`` (``[B, K]``) w.r.t. each map, as
    ``[K, d_out, d_in]`` matrices; for a map in ``projections`` (``(P_out [d_out, r_out], P_in [d_in, r_in])``, either
    None for no projection on that side) its projection ``P_outᵀ ∇ P_in`` ``[K, r_out, r_in]``. Each is contracted
    from the map's tokens (``Σ_t g_t a_tᵀ``; backward passes to the maps' outputs only, one per readout), so a
    projected gradient is never formed at full size. Names the examples whose measurement is not finite."""
    if not examples:
        raise ConceptError(f"{what} needs at least one evaluation example")
    projections = projections or {}
    sides = {m.name: projections.get(m.name, (None, None)) for m in maps}
    grads = {m.name: torch.zeros((k, *(d if p is None else p.shape[1] for d, p in zip(m.shape, sides[m.name]))))
             for m in maps}
    reached = False
    n_batches = (len(examples) + batch_size - 1) // batch_size
    batches = tqdm(iter_batches(examples, batch_size, adapter.pad_token_id), total=n_batches,
                   desc="measurement gradient", disable=not progress, leave=False)
    with adapter.tracking(maps):
        for batch in batches:
            with adapter.capture(maps) as cap:
                per = per_example(batch)
                bad = [i for i, ok in zip(batch.ids, torch.isfinite(per).all(1).tolist()) if not ok]
                if bad:
                    raise ConceptError(f"{what} is not finite on example(s) {', '.join(bad)}")
                values = per.sum(0) / len(examples)
                names = list(cap.outputs)
                mask = batch.attention_mask.bool().to(adapter.device)
                inputs = {n: project_tokens(cap.inputs[n].masked_fill(~mask[..., None], 0), sides[n][1]) for n in names}
                for j in range(k):
                    cap.output_grads.clear()
                    torch.autograd.grad(values[j], [cap.outputs[n] for n in names], retain_graph=j < k - 1,
                                        allow_unused=True)
                    for n, g in cap.output_grads.items():
                        reached = True
                        g = project_tokens(g, sides[n][0])
                        grads[n][j] += (g.flatten(0, 1).T @ inputs[n].flatten(0, 1)).cpu()
    if not reached:
        raise ConceptError(f"no tracked linear map receives gradient from {what}: "
                           f"track maps of blocks before it (tracked: {', '.join(m.name for m in maps) or 'none'})")
    return grads


def project_tokens(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``[B, T, d]``, any float dtype) in float32, times ``basis`` ``[d, r]`` when there is one."""
    x = x.float()
    return x if basis is None else x @ basis.to(x)
