"""SAEs on a model: whether an SAE fits the model, per-example latent activations, latents ranked by how well
they separate concept-positive from concept-negative texts, their top activating examples, and a latent as a
concept function. The rankings on activations already collected are :mod:`probes.sae_latents`.

Activations are read on the same tokens as concepts (``response_mean``: the response tokens; ``last_prompt``;
``all_tokens``): for each example the mean and the maximum of every latent over those tokens, and the token where
the maximum is reached.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from probes.activations import REDUCTIONS, reduce_tokens, token_mask
from probes.directions import ConceptDirection
from probes.sae import SAEError, check_latents, sae_direction, sae_hooks
from probes.sae_latents import LatentActivations, LatentRanking, latent_separation

from .concepts import ConceptFunction
from .data import TokenizedExample, iter_batches
from .models import ModelAdapter

__all__ = ["check_sae_compatible", "latent_activations", "rank_latents", "top_activating_examples",
           "describe_latents", "behaviour_latents", "format_top_examples", "latent_concept", "LATENT_CONCEPT_KINDS"]

LATENT_CONCEPT_KINDS = ("activation", "decoder", "encoder")


def check_sae_compatible(sae, adapter: ModelAdapter, hook_name: str | None = None) -> None:
    """Raise when the SAE does not fit the model: its width (``d_in``, and the decoder's output width)
    must equal the width of the model's activations at its hooks, which must exist (``adapter.check_hook`` raises
    :class:`~.models.HookError` with close matches)."""
    read_hook, write_hook = sae_hooks(sae)
    hooks = {hook_name} if hook_name else {read_hook, write_hook}
    if None in hooks:
        raise SAEError("the SAE's config records no hook name (cfg.metadata.hook_name); pass hook_name=")
    widths = {hook: adapter.hook_width(hook) for hook in sorted(hooks)}  # unknown hooks raise in name order
    for what, width, hook in (("d_in", sae.W_enc.shape[0], hook_name or read_hook),
                              ("decoder output width", sae.W_dec.shape[1], hook_name or write_hook)):
        if width != widths[hook]:
            raise SAEError(
                f"SAE {what} is {width} but the model's activations at {hook!r} have width {widths[hook]}; "
                "the SAE was trained on a different model or hook"
            )


@torch.no_grad()
def latent_activations(sae, adapter: ModelAdapter, examples: Sequence[TokenizedExample], *,
                       reduction: str = "response_mean", latents: Sequence[int] | None = None,
                       hook_name: str | None = None, batch_size: int = 16, progress: bool = False) -> LatentActivations:
    """Mean and maximum activation of each latent (all, or ``latents``) over each example's ``reduction`` tokens.
    The SAE is checked against the model first (hook and width); the forward stops after the hook's block."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    check_sae_compatible(sae, adapter, hook_name)
    hook = hook_name or sae.cfg.metadata.hook_name
    cols = np.arange(sae.cfg.d_sae) if latents is None else np.asarray(check_latents(sae, latents), dtype=int)
    idx = torch.from_numpy(cols)
    means, maxes, argmaxes, ids = [], [], [], []
    n_batches = (len(examples) + batch_size - 1) // batch_size
    for batch in tqdm(iter_batches(examples, batch_size, adapter.pad_token_id), total=n_batches,
                      desc="latent activations", disable=not progress, leave=False):
        z = sae.encode(adapter.activations(batch, hook).float().to(sae.W_enc.device))[..., idx].float().cpu()
        mask = token_mask(batch, reduction).cpu()
        means.append(reduce_tokens(z, batch, reduction))
        best = z.masked_fill(~mask[..., None], float("-inf")).max(dim=1)
        maxes.append(torch.where(mask.any(1, keepdim=True), best.values, torch.zeros_like(best.values)))
        argmaxes.append(best.indices)
        ids.extend(batch.ids)
    d = len(cols)
    cat = lambda xs, dt: torch.cat(xs).numpy().astype(dt) if xs else np.zeros((0, d), dt)  # noqa: E731
    return LatentActivations(ids, cat(means, np.float32), cat(maxes, np.float32), cat(argmaxes, np.int64), cols,
                             hook, reduction)


def rank_latents(sae, adapter: ModelAdapter, positive: Sequence[TokenizedExample],
                 negative: Sequence[TokenizedExample], probe_direction: ConceptDirection | None = None, *,
                 reduction: str = "response_mean", sort_by: str = "auroc", batch_size: int = 16,
                 progress: bool = False) -> LatentRanking:
    """Rank every SAE latent by how well its activation (mean over each example's ``reduction`` tokens) separates
    concept-positive from concept-negative examples: AUROC (default), mean difference, or — given a probe — the
    cosine of its decoder row or encoder column with the probe direction (``sort_by``)."""
    pos, neg = (latent_activations(sae, adapter, x, reduction=reduction, batch_size=batch_size, progress=progress)
                for x in (positive, negative))
    return latent_separation(pos, neg, sae, probe_direction, sort_by)


def _snippet(tokenizer, ids: Sequence[int], pos: int, before: int, after: int) -> str:
    left = tokenizer.decode(list(ids[max(pos - before, 0): pos]))
    tok = tokenizer.decode([ids[pos]])
    right = tokenizer.decode(list(ids[pos + 1: pos + 1 + after]))
    return " ".join(f"{left}⟦{tok}⟧{right}".split())


def top_activating_examples(acts: LatentActivations, examples: Sequence[TokenizedExample], tokenizer, latent: int,
                            k: int = 5, context: int = 8) -> list[dict]:
    """The ``k`` examples where ``latent`` reaches its highest activation (over the reduction's tokens): id,
    maximum and mean activation, the token at the maximum and a snippet of ``context`` tokens around it
    (the token in ⟦ ⟧). ``examples`` must be those ``acts`` was collected on, in order."""
    if [e.id for e in examples] != acts.ids:
        raise ValueError("examples do not match the ids the activations were collected on")
    j = acts.column(latent)
    order = np.argsort(-acts.max[:, j], kind="stable")[:k]
    out = []
    for i in order:
        if acts.max[i, j] <= 0:
            break
        e, pos = examples[i], int(acts.argmax[i, j])
        out.append({"id": e.id, "max": float(acts.max[i, j]), "mean": float(acts.mean[i, j]),
                    "token": tokenizer.decode([e.input_ids[pos]]),
                    "snippet": _snippet(tokenizer, e.input_ids, pos, context, context // 2)})
    return out


def describe_latents(acts: LatentActivations, examples: Sequence[TokenizedExample], tokenizer,
                     latents: Sequence[int], n_tokens: int = 3, k: int = 20) -> dict[int, str]:
    """A short label per latent: the most frequent distinct tokens at its maximum over its ``k`` top examples
    (``"—"`` for a latent that never fires on these examples)."""
    labels = {}
    for latent in latents:
        counts: dict[str, int] = {}
        for ex in top_activating_examples(acts, examples, tokenizer, latent, k, context=0):
            t = repr(ex["token"].strip() or ex["token"])
            counts[t] = counts.get(t, 0) + 1
        labels[int(latent)] = ", ".join(sorted(counts, key=lambda t: -counts[t])[:n_tokens]) or "—"
    return labels


def latent_concept(sae, latents: int | Sequence[int], eval_examples: Sequence[TokenizedExample] | None = None, *,
                   kind: str = "activation", adapter: ModelAdapter | None = None, hook_name: str | None = None,
                   reduction: str = "response_mean"):
    """A concept function built on SAE latents, for every estimator (Concept Influence, gradient dot, the fast
    probe projection): ``kind="activation"`` reads the latents' activations (nonlinear), ``"decoder"``/``"encoder"``
    project on their decoder rows / encoder columns. With ``adapter`` the SAE is checked against the model first
    (hook and ``d_in``); latent indices are checked against ``d_sae``."""
    if kind not in LATENT_CONCEPT_KINDS:
        raise ValueError(f"kind must be one of {LATENT_CONCEPT_KINDS}, got {kind!r}")
    latents = check_latents(sae, [latents] if isinstance(latents, (int, np.integer)) else list(latents))
    if not latents:
        raise SAEError("latent_concept needs at least one latent")
    if adapter is not None:
        check_sae_compatible(sae, adapter, hook_name)
    if kind == "activation":
        return ConceptFunction.from_sae_latents(sae, latents, eval_examples, hook_name, reduction)
    directions = []
    for i in latents:
        d = sae_direction(sae, i, kind, hook_name)
        d.metadata["name"] = f"sae_{kind}_{i}"
        directions.append(d)
    return ConceptFunction.from_directions(directions, eval_examples, reduction)


def behaviour_latents(sae, adapter: ModelAdapter, positive: Sequence[TokenizedExample],
                      negative: Sequence[TokenizedExample], *, probe: ConceptDirection | None = None,
                      sort_by: str = "auroc", top: int = 20, show: Sequence[int] | None = None, n_examples: int = 5,
                      progress: bool = False) -> tuple[LatentRanking, dict[int, list[dict]]]:
    """The SAE's latents ranked by how well they separate ``positive`` from ``negative`` examples
    (:func:`~probes.sae_latents.latent_separation`, labelled by :func:`describe_latents`), and the ``n_examples`` top
    activating examples of each latent of ``show`` (default: the ``top`` of the ranking)."""
    if show:
        check_latents(sae, list(show))
    acts = [latent_activations(sae, adapter, x, progress=progress) for x in (positive, negative)]
    ranking = latent_separation(*acts, sae=sae, probe_direction=probe, sort_by=sort_by)
    show = list(show or ranking.top(top))
    both, all_acts = list(positive) + list(negative), LatentActivations.concat(acts)
    ranking.labels = describe_latents(all_acts, both, adapter.tokenizer, ranking.top(top) + show)
    return ranking, {i: top_activating_examples(all_acts, both, adapter.tokenizer, i, n_examples) for i in show}


def format_top_examples(examples_by_latent: Mapping[int, list[dict]], labels: Mapping[int, str] | None = None) -> str:
    """Markdown: for each latent, its top activating examples (activation and snippet)."""
    lines = []
    for latent, rows in examples_by_latent.items():
        label = f" ({labels[latent]})" if labels and latent in labels else ""
        lines += [f"**latent {latent}**{label}", ""]
        lines += [f"- {r['max']:.2f} `{r['id']}`: {r['snippet']}" for r in rows] or ["- (never active)"]
        lines.append("")
    return "\n".join(lines)
