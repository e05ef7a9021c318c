"""An example's features for the row encoder (:mod:`.encoder`), from one forward pass: its loss tokens' inputs to the
index's maps, projected on the index's input bases, pooled as their mean and as their second moments in a few
principal components."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .concepts import project_tokens
from .data import Batch
from .errors import ConceptInfluenceError
from .index.subspace import MapSpace
from .models import ModelAdapter

__all__ = ["EncoderError", "TokenFeatures", "distinct_inputs", "forward_tokens", "loss_positions"]


class EncoderError(ConceptInfluenceError, ValueError):
    """An encoder cannot be fitted, used or read as asked; the message names the argument, file or model."""


def loss_positions(batch: Batch, loss_tokens: str) -> torch.Tensor:
    """Boolean ``[B, T]``: the positions whose next token is in the loss (``response`` or ``all`` tokens), i.e. the
    tokens whose ``a_t`` and ``g_t`` make up the row."""
    mask = batch.response_mask.bool() if loss_tokens == "response" else batch.attention_mask.bool()
    positions = torch.zeros_like(mask)
    positions[:, :-1] = mask[:, 1:]
    return positions


def _adapter_maps(adapter: ModelAdapter, layout: Sequence[dict]) -> dict:
    held = {m.name: m for m in adapter.linear_maps()}
    missing = [e["name"] for e in layout if e["name"] not in held]
    if missing:
        raise EncoderError(f"the model has no map {missing[0]} (the index's maps are {layout[0]['name']}.."
                           f"{layout[-1]['name']})")
    return held


def distinct_inputs(adapter: ModelAdapter, layout: Sequence[dict], spaces: Sequence[MapSpace]) -> list[dict]:
    """The entries of ``layout`` whose projected input is no earlier entry's: maps that read the same tensor with the
    same basis (``W_Q``, ``W_K``, ``W_V`` share their input and its EK-FAC factor) would repeat each other's
    features."""
    held, by_name = _adapter_maps(adapter, layout), {s.name: s for s in spaces}
    kept, seen = [], []
    for e in layout:
        m, basis = held[e["name"]], by_name[e["name"]].p_in
        key = (id(m.input_module), m.input_from)
        if not any(k == key and (b is None) == (basis is None) and (b is None or torch.equal(b, basis)) for k, b in seen):
            seen.append((key, basis))
            kept.append(e)
    return kept


@torch.no_grad()
def forward_tokens(adapter: ModelAdapter, layout: Sequence[dict], spaces: Sequence[MapSpace], batch: Batch,
                   loss_tokens: str) -> list[torch.Tensor]:
    """Per example of ``batch``, ``[t_i, p]``: at each loss position, every map of ``layout`` (the index manifest's
    ``maps``, or the first of them) has its input projected on its space's ``P_in``, side by side. One forward,
    stopped after the last of the maps' blocks; nothing is differentiated."""
    names = [e["name"] for e in layout]
    held = _adapter_maps(adapter, layout)
    by_name = {s.name: s for s in spaces}
    last = max(e["block"] for e in layout)
    with adapter.capture([held[n] for n in names]) as cap:
        adapter.activations(batch, f"blocks.{last}.hook_resid_post")
    mask = loss_positions(batch, loss_tokens).to(cap.inputs[names[0]].device)
    x = torch.cat([project_tokens(cap.inputs[n][mask], by_name[n].p_in) for n in names], -1).cpu()
    return list(x.split(mask.sum(1).tolist()))


@dataclass
class TokenFeatures:
    """Standardisation (``mean``, ``scale`` ``[p]``) and the top principal directions ``basis`` ``[p, k]`` of token
    vectors; :meth:`pooled` turns an example's tokens into ``[mean of the standardised tokens, mean of the upper
    triangle of c_t c_tᵀ]`` with ``c_t`` a token's ``k`` components."""

    mean: torch.Tensor
    scale: torch.Tensor
    basis: torch.Tensor

    @classmethod
    def fit(cls, tokens: Sequence[torch.Tensor], rank: int) -> "TokenFeatures":
        """Fitted on the tokens of a sample of examples (``[t_i, p]`` each); ``rank`` components (at most ``p``)."""
        if rank < 1:
            raise EncoderError(f"token_rank must be at least 1, got {rank}")
        x = torch.cat(list(tokens)).double()
        if len(x) < 2:
            raise EncoderError("the sample has fewer than two loss tokens; nothing to fit an encoder on")
        mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
        basis = torch.linalg.svd((x - mean) / scale, full_matrices=False).Vh[:rank].T
        return cls(mean.float(), scale.float(), basis.float().contiguous())

    def pooled(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[n, p + k(k+1)/2]`` features of ``n`` examples (an example with no loss token gets zeros)."""
        k = self.basis.shape[1]
        upper = torch.triu_indices(k, k)
        rows = []
        for t in tokens:
            z = (t.float() - self.mean) / self.scale
            c = z @ self.basis
            second = (c.T @ c / max(len(c), 1))[upper[0], upper[1]]
            rows.append(torch.cat([z.sum(0) / max(len(z), 1), second]))
        return torch.stack(rows) if rows else torch.zeros(0, len(self.mean) + len(upper[0]))
