"""Products with the curvature matrix that EK-FAC approximates, over its fit examples, for K vectors at once.

The vectors live on the tracked maps' weights in matrix form (``{map name: [K, d_out, d_in]}``). The matrix is the
Fisher of the per-example loss ``L(z)`` (mean cross-entropy over the response tokens), averaged over the examples,
with the labels of one of three kinds (``labels``):

* ``"expected"``: the expectation over labels drawn from the model, exactly — the true Fisher, which for a softmax
  output is the Gauss-Newton matrix ``mean_z (1/n_z²) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` (``J_t`` the Jacobian of
  token ``t``'s logits, ``n_z`` the example's response tokens). It is what a ``fisher="true"`` EK-FAC fit estimates,
  without the noise of one draw, and what ``tests/test_curvature.py`` compares EK-FAC against. Computed with
  ``torch.func``: a forward-mode ``jvp`` gives ``J v``, one ``vjp`` per batch carries ``H J v`` back; attention runs
  on PyTorch's math kernel, the one with forward-mode derivatives. (``curvlinops`` has GGN operators, but for a loss
  that is a sum over samples; this per-example mean over a masked, variable number of tokens would need wrapping
  the model and the loss both, for the few lines here.)
* ``"sampled"``: ``mean_z ∇L_z(ŷ) ∇L_z(ŷ)ᵀ`` with ``ŷ`` drawn as the EK-FAC fit drew them (same ``seed``,
  :func:`~concept_influence.gradients.sample_labels`): the Monte-Carlo estimate whose diagonal in EK-FAC's eigenbasis
  is exactly EK-FAC's corrected eigenvalues. Rank at most the number of examples.
* ``"data"``: the same with the data's labels, the empirical Fisher (what a ``fisher="empirical"`` fit estimates).

The last two take one ordinary forward+backward per batch (the shared pipeline,
:func:`~concept_influence.gradients.captured_batches`) and each example's gradient per map.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..data import TokenizedExample, iter_batches
from ..gradients import captured_batches
from ..models import LinearMap, ModelAdapter
from .base import CurvatureError

__all__ = ["GaussNewton", "LABELS"]

LABELS = ("expected", "sampled", "data")


class _Logits(torch.nn.Module):
    """The adapter's logits as a module call, so that ``functional_call`` can swap the tracked weights."""

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.model = adapter.model
        self.adapter = [adapter]  # (a list: not a submodule)

    def forward(self, batch) -> torch.Tensor:
        logits = self.adapter[0].logits(batch)[:, :-1]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


class GaussNewton:
    """The Fisher of ``maps``' weights over ``examples`` with ``labels`` as the module docstring says; calling it on
    ``{map name: V [K, d_out, d_in]}`` returns ``F V`` for those maps (same keys, shapes and dtype)."""

    def __init__(self, adapter: ModelAdapter, examples: Sequence[TokenizedExample], maps: Sequence[LinearMap], *,
                 labels: str = "expected", seed: int = 0, batch_size: int = 8, progress: bool = False) -> None:
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
        if not examples:
            raise ValueError("the Gauss-Newton matrix needs at least one fit example")
        self.adapter, self.examples, self.labels = adapter, list(examples), labels
        self.maps = {m.name: m for m in maps}
        self.seed, self.batch_size, self.progress = seed, batch_size, progress

    def __call__(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = [name for name in vectors if name not in self.maps]
        if unknown:
            raise CurvatureError(f"no Gauss-Newton products for map {unknown[0]!r}; maps: {', '.join(self.maps)}")
        maps = [self.maps[name] for name in vectors]
        weight = maps[0].weight
        v = {name: x.to(device=weight.device, dtype=weight.dtype) for name, x in vectors.items()}
        product = self._expected(maps, v) if self.labels == "expected" else self._outer(maps, v)
        return {name: (product[name] / len(self.examples)).to(vectors[name]) for name in vectors}

    def _expected(self, maps: list[LinearMap], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``Σ_z (1/n_z²) Σ_t J_tᵀ H_t J_t V`` (not yet divided by the number of examples)."""
        adapter, logits = self.adapter, _Logits(self.adapter)
        keys = {id(p): f"model.{n}" for n, p in adapter.model.named_parameters()}
        weights = tuple(m.to_matrix(m.weight.detach()) for m in maps)
        out = {m.name: torch.zeros_like(v[m.name]) for m in maps}
        n_batches = -(-len(self.examples) // self.batch_size)
        with adapter.tracking(maps), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for batch in tqdm(iter_batches(self.examples, self.batch_size, adapter.pad_token_id), total=n_batches,
                              desc="Gauss-Newton products", disable=not self.progress, leave=False):
                batch = batch.to(adapter.device)

                def forward(*matrices):
                    params = {keys[id(m.weight)]: m.from_matrix(w) for m, w in zip(maps, matrices)}
                    return functional_call(logits, params, (batch,))

                z, pull = vjp(forward, *weights)
                p = torch.softmax(z, dim=-1)
                mask = batch.response_mask[:, 1:].to(z.dtype)
                token_weight = (mask / mask.sum(1, keepdim=True).clamp_min(1) ** 2)[..., None]
                for k in range(next(iter(v.values())).shape[0]):
                    _, jv = jvp(forward, weights, tuple(v[m.name][k] for m in maps))
                    h = p * (jv - (p * jv).sum(-1, keepdim=True))  # (diag p − p pᵀ) J v
                    for m, back in zip(maps, pull(h * token_weight)):
                        out[m.name][k] += back
        return out

    def _outer(self, maps: list[LinearMap], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``Σ_z G_z ⟨G_z, V⟩`` with ``G_z`` each example's gradient under the sampled or the data's labels."""
        out = {m.name: torch.zeros_like(v[m.name]) for m in maps}
        seed = self.seed if self.labels == "sampled" else None
        for _, captured in captured_batches(self.adapter, self.examples, maps, batch_size=self.batch_size,
                                            label_seed=seed, error=CurvatureError, desc="Fisher products",
                                            progress=self.progress):
            grads = {}
            for m in maps:
                a, g = captured[m.name]
                if g is not None:  # (a map the loss does not reach adds nothing)
                    grads[m.name] = g.to(v[m.name]).transpose(1, 2) @ a.to(v[m.name])  # [B, d_out, d_in]
            dots = sum(grad.flatten(1) @ v[name].flatten(1).T for name, grad in grads.items())  # [B, K]
            for name, grad in grads.items():
                out[name] += torch.einsum("bk,boi->koi", dots, grad)
        return out
