"""The Bergson comparison (speed benchmark part B): Bergson's EK-FAC scores of our concept against ours.

Bergson (EleutherAI, ``pip install bergson``) has no concept measurement of its own: its query gradients are
loss gradients of query documents. The bridge hands it our concept gradient ∇f as the query, the way its
``hessian_pipeline`` takes an existing query index, and runs the rest of that pipeline in process on a copy of
the model: the EK-FAC fit (``fit_factored_hessians``: K-FAC covariances, eigendecomposition, eigenvalue
correction), ``FactoredPreconditioner.apply`` on ∇f, and one pass of per-example training gradients scored
against it (``collect_gradients`` with a ``Scorer``, as ``bergson score`` does).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence
from unittest import mock

import torch
from tqdm.auto import tqdm

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature.ekfac import DEFAULT_DAMPING_FACTOR
from concept_influence.data import TokenizedExample, iter_batches
from concept_influence.gradients import sample_labels
from concept_influence.models import HFCausalLMAdapter

from .speed_setup import map_names_by_module

__all__ = ["BERGSON_VERSION", "BERGSON_SETTINGS", "BERGSON_DIFFERENCES", "bergson_concept_scores", "bergson_unavailable",
           "import_bergson"]

BERGSON_VERSION = "2.5.1"
IGNORE = -100  # Bergson's (and torch's) label of a position without loss
BERGSON_SETTINGS = {
    "HessianConfig": "method='kfac', ev_correction=True (EK-FAC), hessian_dtype='fp32' (eigendecomposition in "
                     "float64), use_dataset_labels=True with our sampled labels as the dataset labels",
    "IndexConfig": "loss_reduction='mean' (per-example mean response-token loss), projection_dim=0 (no random "
                   "projection), precision fp32, token_batch_size = batch size × longest example, "
                   "max_batch_size = batch size",
    "InversionConfig": "inversion='damped_inverse', damping_factor=0.1 (0.1 × mean Λ per module, as ours)",
    "ScoreConfig": "precision='fp32', one query per concept (∇f_k), scored in one pass, score='individual'",
}
BERGSON_DIFFERENCES = (
    "Bergson's Fisher weights example z by 1/T_z (T_z: its loss tokens; the Gauss-Newton Hessian of the mean "
    "loss), ours and kronfluence's by 1/T_z² (E[∇L_z ∇L_zᵀ] of the per-example mean loss L_z): the same up to a "
    "constant factor only when all examples have as many response tokens; Bergson packs examples into batches by "
    "length (less padding); ∇f comes from our code, as Bergson's queries are loss gradients of query documents. "
    "Matched by the bridge: our sampled labels are Bergson's dataset labels, and as its covariances leave out "
    "each document's last position (ours do not), its fit documents get one padding token more, without loss"
)


def import_bergson():
    """``import bergson`` and the modules the bridge uses, keeping the root logger as it was (Bergson's logger
    module calls ``logging.basicConfig(force=True)``)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import bergson
        import bergson.collector.collector
        import bergson.hessians.eigenvectors
        import bergson.hessians.hessian_approximations
        import bergson.hessians.preconditioner
        import bergson.score.score_writer  # noqa: F401  (every module the bridge uses)
    finally:
        root.handlers[:], root.level = handlers, level
    return bergson


def bergson_unavailable() -> str | None:
    """Why the Bergson comparison cannot run here (one line), or None when it can."""
    try:
        bergson = import_bergson()
    except ImportError as e:
        return f"bergson is not importable ({e}); install it with `make install`"
    if bergson.__version__ != BERGSON_VERSION:
        return f"bergson {bergson.__version__} is installed; the bridge drives the internals of {BERGSON_VERSION}"
    return None


@contextmanager
def _quiet_bergson() -> Iterator[None]:
    """Bergson imported (see :func:`import_bergson`) and running without progress bars."""
    import datasets

    bergson = import_bergson()
    quiet = partial(tqdm, disable=True)
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # saving the scored dataset
    try:
        with (mock.patch.object(bergson.collector.collector, "tqdm", quiet),
              mock.patch.object(bergson.hessians.eigenvectors, "tqdm", quiet)):
            yield
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def _documents(examples: Sequence[TokenizedExample], labels: Sequence[Sequence[int]], pad_token_id: int | None = None):
    """A ``datasets.Dataset`` of Bergson documents: ``input_ids``, ``labels`` (``labels[t]`` is the target
    of position ``t - 1``; IGNORE where there is no loss) and ``length``.

    With ``pad_token_id``, each document gets one more token (a padding token without loss): Bergson's
    covariances skip every document's last position, ours do not, so the extra one is what it skips (in a
    causal model it changes nothing before it)."""
    from datasets import Dataset

    extra = [] if pad_token_id is None else [pad_token_id]
    ids = [list(e.input_ids) + extra for e in examples]
    labels = [list(lab) + [IGNORE] * len(extra) for lab in labels]
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [len(i) for i in ids]})


def _response_labels(example: TokenizedExample, targets: Sequence[int] | None = None) -> list[int]:
    """Labels on the response tokens only (our loss): the data's tokens, or ``targets`` (``targets[t]`` the
    label of position ``t``, as :func:`sample_labels` returns them) shifted into Bergson's layout."""
    start = example.response_start
    tokens = list(example.input_ids) if targets is None else [IGNORE] + list(targets)
    return [IGNORE] * start + tokens[start:len(example.input_ids)]


@torch.no_grad()
def _sampled_labels(adapter: HFCausalLMAdapter, examples: Sequence[TokenizedExample], batch_size: int,
                    seed: int) -> list[list[int]]:
    """Our true-Fisher labels (:func:`sample_labels`, seeded per example) in Bergson's label layout."""
    out = []
    for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
        logits = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        targets = sample_labels(logits, batch, seed)
        start = len(out)
        out += [_response_labels(examples[start + b], targets[b].tolist()) for b in range(len(batch))]
    return out


def bergson_concept_scores(adapter: HFCausalLMAdapter, examples: Sequence[TokenizedExample], concept: ConceptFunction,
                           output_dir: str | Path, batch_size: int = 16, seed: int = 0,
                           damping_factor: float = DEFAULT_DAMPING_FACTOR) -> dict:
    """Concept Influence of ``examples`` computed by Bergson on a copy of the adapter's model: EK-FAC with the
    true Fisher (our sampled labels), CPU, float32 (eigendecomposition float64), damping ``damping_factor`` ×
    mean(Λ) per module, no random projection, the same linear maps as ours (blocks up to the concept's layer)
    and our ∇f as the query: the concept's K gradients are K queries, scored in one pass (Bergson's ``Scorer``
    takes several). What still differs from ours is :data:`BERGSON_DIFFERENCES`.

    Returns ``scores`` ``[N, K]`` (sign-aligned with ours: −Bergson's ``(H⁻¹∇f)·∇L(z)``), ``fit_seconds`` (the
    EK-FAC fit), ``score_seconds`` (∇f, its preconditioning and the scoring pass), ``label_seconds`` (sampling
    our labels, a forward pass Bergson does not need when it samples its own; not in the other two), the per-map
    ``dampings`` (by our map names) and ``tracked_modules`` (Bergson's names)."""
    with _quiet_bergson():
        from bergson import collect_gradients
        from bergson.config.config import HessianConfig, IndexConfig, InversionConfig
        from bergson.data import allocate_batches
        from bergson.gradients import GradientProcessor
        from bergson.hessians.hessian_approximations import fit_factored_hessians
        from bergson.hessians.preconditioner import FactoredPreconditioner
        from bergson.score.score_writer import InMemorySequenceScoreWriter
        from bergson.score.scorer import Scorer

        model = copy.deepcopy(adapter.model).eval()  # eval, as from_pretrained leaves the models Bergson loads
        to_ours = map_names_by_module(HFCausalLMAdapter(model, adapter.tokenizer), concept.layer, model.base_model)
        examples = list(examples)
        out = Path(output_dir)
        result: dict = {"tracked_modules": list(to_ours)}

        start = time.perf_counter()
        fit_data = _documents(examples, _sampled_labels(adapter, examples, batch_size, seed), adapter.pad_token_id)
        result["label_seconds"] = time.perf_counter() - start
        score_data = _documents(examples, [_response_labels(e) for e in examples])

        # As Bergson's setup_model_and_peft: no weight gradients, only the hooks' per-module ones.
        model.requires_grad_(False)
        model.get_input_embeddings().requires_grad_(True)
        index_cfg = IndexConfig(run_path=str(out / "index"), loss_reduction="mean", precision="fp32",
                                token_batch_size=batch_size * max(fit_data["length"]),
                                max_batch_size=batch_size)
        hessian_cfg = HessianConfig(method="kfac", ev_correction=True, hessian_dtype="fp32", use_dataset_labels=True)
        batches = {name: allocate_batches(data["length"][:], index_cfg.token_batch_size, max_batch_size=batch_size)
                   for name, data in (("fit", fit_data), ("score", score_data))}
        hessian_path = out / "hessian"
        for path in (hessian_path, index_cfg.partial_run_path):  # this function's own outputs of an earlier call
            shutil.rmtree(path, ignore_errors=True)
        index_cfg.partial_run_path.mkdir(parents=True)

        start = time.perf_counter()
        fit_factored_hessians(model, fit_data, index_cfg, hessian_cfg, target_modules=set(to_ours), attention_cfgs={},
                              batches=batches["fit"], path=str(hessian_path), do_eigendecomposition=True)
        result["fit_seconds"] = time.perf_counter() - start

        start = time.perf_counter()
        grads = concept.gradient(adapter, adapter.linear_maps(concept.layer), batch_size=batch_size)  # [K, d_out, d_in]
        inversion = InversionConfig(inversion="damped_inverse", damping_factor=damping_factor)
        preconditioner = FactoredPreconditioner.from_path(hessian_path, inversion_cfg=inversion, ev_correction=True)
        query = preconditioner.apply({name: grads[ours].reshape(concept.k, -1) for name, ours in to_ours.items()})
        writer = InMemorySequenceScoreWriter(len(score_data), concept.k)
        scorer = Scorer(query, list(to_ours), writer, torch.device("cpu"), torch.float32)
        collect_gradients(model, score_data, GradientProcessor(include_bias=False), index_cfg, batches=batches["score"],
                          target_modules=set(to_ours), scorer=scorer)
        result["score_seconds"] = time.perf_counter() - start
        result["scores"] = -writer.scores.double().numpy()
        result["dampings"] = {to_ours[name]: damping_factor * float(lam.mean()) for name, lam in preconditioner.lambdas.items()}
    return result
