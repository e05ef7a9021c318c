"""Which SAE latents carry a behaviour: per-example latent activations, latents ranked by how well they separate
concept-positive from concept-negative texts (and by cosine with a probe), their top activating examples, and a
latent as a concept function.

Activations are read on the same tokens as concepts (``response_mean``: the response tokens; ``last_prompt``;
``all_tokens``): for each example the mean and the maximum of every latent over those tokens, and the token where
the maximum is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from concept_influence.data import TokenizedExample, iter_batches
from concept_influence.models import ModelAdapter

from .activations import REDUCTIONS, reduce_tokens, token_mask
from .directions import ConceptDirection
from .sae import SAEError, check_latents, check_sae_compatible, sae_direction

__all__ = ["LatentActivations", "LatentRanking", "latent_activations", "rank_latents", "latent_separation",
           "top_activating_examples", "describe_latents", "latent_concept", "auroc_columns",
           "format_top_examples", "LATENT_CONCEPT_KINDS", "SORT_KEYS"]

LATENT_CONCEPT_KINDS = ("activation", "decoder", "encoder")


@dataclass
class LatentActivations:
    """Per-example latent activations over the tokens of ``reduction``: ``mean`` and ``max`` ``[N, n_latents]``
    and ``argmax`` (the token index of the maximum) for the examples ``ids``; column j is latent ``latents[j]``."""

    ids: list[str]
    mean: np.ndarray
    max: np.ndarray
    argmax: np.ndarray
    latents: np.ndarray
    hook_name: str
    reduction: str

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, latent: int) -> int:
        """The column of ``latent`` (SAEError when it was not collected)."""
        hits = np.flatnonzero(self.latents == latent)
        if not len(hits):
            raise SAEError(f"latent {latent} was not collected (collected: {len(self.latents)} latents)")
        return int(hits[0])

    @classmethod
    def concat(cls, parts: Sequence["LatentActivations"]) -> "LatentActivations":
        """Rows of several collections (same latents, hook and reduction) in order."""
        first = parts[0]
        if any(not np.array_equal(p.latents, first.latents) or (p.hook_name, p.reduction) !=
               (first.hook_name, first.reduction) for p in parts):
            raise SAEError("cannot join latent activations of different latents, hooks or reductions")
        return cls([i for p in parts for i in p.ids], *(np.concatenate([getattr(p, a) for p in parts])
                                                        for a in ("mean", "max", "argmax")),
                   first.latents, first.hook_name, first.reduction)

    def subset(self, rows: Sequence[int]) -> "LatentActivations":
        rows = list(rows)
        return LatentActivations([self.ids[i] for i in rows], self.mean[rows], self.max[rows], self.argmax[rows],
                                 self.latents, self.hook_name, self.reduction)


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


def auroc_columns(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUROC of each column for separating ``positive`` rows from ``negative`` rows (Mann-Whitney U with
    average ranks for ties, as scikit-learn's ``roc_auc_score``), vectorised over columns."""
    from scipy.stats import rankdata

    n_pos, n_neg = len(positive), len(negative)
    if not n_pos or not n_neg:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative rows")
    ranks = rankdata(np.concatenate([positive, negative]), axis=0)
    return (ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class LatentRanking:
    """Every latent's separation of concept-positive from concept-negative examples, ranked by ``sort_by``.

    ``columns`` maps a measure to a ``[n_latents]`` array aligned with ``latents``: ``mean_pos``, ``mean_neg``,
    ``diff`` (mean_pos − mean_neg), ``auroc`` (the latent's activation as a classifier of positive vs negative),
    ``freq_pos``/``freq_neg`` (share of examples where it fires), and with a probe ``cos_decoder``/``cos_encoder``
    (cosine of the latent's decoder row / encoder column with the probe direction). ``order`` lists positions in
    ``latents``, best first."""

    latents: np.ndarray
    columns: dict[str, np.ndarray]
    sort_by: str
    order: np.ndarray
    labels: dict[int, str] = field(default_factory=dict)

    def top(self, n: int = 10) -> list[int]:
        """The ``n`` best latents."""
        return [int(self.latents[i]) for i in self.order[:n]]

    def _row_at(self, j: int) -> dict:
        latent = int(self.latents[j])
        return {"latent": latent, **{k: float(v[j]) for k, v in self.columns.items()},
                **({"label": self.labels[latent]} if latent in self.labels else {})}

    def row(self, latent: int) -> dict:
        """Every measure of one latent (and its label, when set)."""
        hits = np.flatnonzero(self.latents == latent)
        if not len(hits):
            raise SAEError(f"latent {latent} is not in this ranking")
        return self._row_at(int(hits[0]))

    def rows(self, n: int | None = None) -> list[dict]:
        """The rows of the ``n`` best latents (all by default), best first."""
        return [self._row_at(int(j)) for j in self.order[: len(self.order) if n is None else n]]

    def to_markdown(self, n: int = 15) -> str:
        """The top ``n`` latents as a markdown table."""
        names = list(self.columns)
        head = "| rank | latent | " + " | ".join(names) + (" | top tokens |" if self.labels else " |")
        lines = [head, "|" + "---|" * (len(names) + 2 + bool(self.labels))]
        for r, row in enumerate(self.rows(n), start=1):
            cells = " | ".join(f"{row[k]:.3f}" for k in names)
            lines.append(f"| {r} | {row['latent']} | {cells} |" + (f" {row.get('label', '')} |" if self.labels else ""))
        return "\n".join(lines)


SORT_KEYS = ("auroc", "diff", "cos_decoder", "cos_encoder")


def latent_separation(positive: LatentActivations, negative: LatentActivations, sae=None,
                      probe_direction: ConceptDirection | None = None, sort_by: str = "auroc") -> LatentRanking:
    """Rank latents from activations already collected (see :func:`rank_latents`)."""
    if not np.array_equal(positive.latents, negative.latents):
        raise SAEError("positive and negative activations were collected for different latents")
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by must be one of {SORT_KEYS}, got {sort_by!r}")
    cols = {"mean_pos": positive.mean.mean(0), "mean_neg": negative.mean.mean(0)}
    cols["diff"] = cols["mean_pos"] - cols["mean_neg"]
    cols["auroc"] = auroc_columns(positive.mean, negative.mean)
    cols["freq_pos"] = (positive.max > 0).mean(0)
    cols["freq_neg"] = (negative.max > 0).mean(0)
    if probe_direction is not None:
        if sae is None:
            raise ValueError("cosines with a probe need the SAE")
        if probe_direction.hook_name != positive.hook_name:
            raise SAEError(f"the probe is at {probe_direction.hook_name!r} but the SAE reads {positive.hook_name!r}")
        unit = probe_direction.unit.double()
        if unit.shape[0] != sae.cfg.d_in:
            raise SAEError(f"the probe has size {unit.shape[0]} but the SAE's d_in is {sae.cfg.d_in}")
        idx = torch.from_numpy(positive.latents)
        for name, w in (("cos_decoder", sae.W_dec.detach()[idx]), ("cos_encoder", sae.W_enc.detach()[:, idx].T)):
            w = w.double()
            cols[name] = (w @ unit / w.norm(dim=1).clamp_min(1e-12)).numpy()
    if sort_by not in cols:
        raise ValueError(f"sort_by={sort_by!r} needs a probe direction")
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    order = np.lexsort((-cols["diff"], -cols[sort_by]))  # ties (e.g. dead latents at AUROC 0.5) by difference
    return LatentRanking(positive.latents, cols, sort_by, order)


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
    from concept_influence.concepts import ConceptFunction

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


def format_top_examples(examples_by_latent: Mapping[int, list[dict]], labels: Mapping[int, str] | None = None) -> str:
    """Markdown: for each latent, its top activating examples (activation and snippet)."""
    lines = []
    for latent, rows in examples_by_latent.items():
        label = f" ({labels[latent]})" if labels and latent in labels else ""
        lines += [f"**latent {latent}**{label}", ""]
        lines += [f"- {r['max']:.2f} `{r['id']}`: {r['snippet']}" for r in rows] or ["- (never active)"]
        lines.append("")
    return "\n".join(lines)
