"""Bergson's gradient index beside ours (the index benchmark): its own pipeline for a compressed, preconditioned
index, in process on a copy of the model.

Bergson 2.5 compresses each module's per-example gradient with a double-sided random projection to ``p × p``
(``GradientProcessor(projection_dim=p)``, Rademacher, as LoGra and TrackStar do) and preconditions in that space with
the damped second moment of the projected gradients (the autocorrelation Hessian, fitted by its own pass over the data):
two passes (``AutocorrelationCollector``, then ``collect_gradients`` writing ``gradients.bin``), then ``Attributor``
loads the rows and scores queries. Its queries are loss gradients of query documents; the bridge gives it ours (a
concept's ∇f, or a test loss gradient) projected with its own matrices (``create_module_projection_matrix``), as its
trace collector projects the gradients it records. Rows are stored in the model's dtype (float32 here).
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from concept_influence.curvature.ekfac import DEFAULT_DAMPING_FACTOR
from concept_influence.data import TokenizedExample
from concept_influence.models import HFCausalLMAdapter

from .bergson_bridge import _documents, _quiet_bergson, _response_labels
from .speed_setup import map_names_by_module

__all__ = ["BergsonIndex", "build_bergson_index"]


@dataclass
class BergsonIndex:
    """A Bergson index on disk: the rows (``path``), the autocorrelation Hessian (``hessian_path``), the projection
    dimension, Bergson's module names mapped to ours, and the seconds of each pass."""

    path: Path
    hessian_path: Path
    projection_dim: int
    to_ours: dict[str, str]
    hessian_seconds: float
    build_seconds: float

    def bytes_per_example(self) -> int:
        """Bytes of one stored row (float32)."""
        return 4 * self.projection_dim ** 2 * len(self.to_ours)

    def scores(self, grads: dict[str, torch.Tensor], damping_factor: float = DEFAULT_DAMPING_FACTOR) -> tuple[np.ndarray, float]:
        """Every indexed example scored against the query gradients ``grads`` (``{our map name: [K, d_out, d_in]}``),
        sign-aligned with ours (``−qᵀ H⁻¹ g``), and the seconds of loading the index and the search."""
        with _quiet_bergson():
            from bergson import Attributor
            from bergson.collector.collector import create_module_projection_matrix
            from bergson.config.config import InversionConfig
            from bergson.gradients import GradientProcessor

            start = time.perf_counter()
            processor = GradientProcessor.load(self.path, skip_hessians=True)
            queries = {}
            for name, ours in self.to_ours.items():
                k, d_out, d_in = grads[ours].shape
                left, right = (create_module_projection_matrix(name, role, self.projection_dim, d, torch.float32, "cpu",
                                                               processor.projection_type, processor.projection_scale,
                                                               processor.projection_seed)
                               for role, d in (("left", d_out), ("right", d_in)))
                queries[name] = (left @ grads[ours].float() @ right.T).flatten(1)
            attributor = Attributor(self.path, hessian_path=self.hessian_path,
                                    inversion_cfg=InversionConfig(inversion="damped_inverse", damping_factor=damping_factor))
            values, indices = attributor.search(queries, None)
            scores = torch.zeros_like(values).scatter_(1, indices, values).T
            return -scores.double().numpy(), time.perf_counter() - start


def build_bergson_index(adapter: HFCausalLMAdapter, examples: Sequence[TokenizedExample], max_block: int,
                        projection_dim: int, out: str | Path, batch_size: int = 8) -> BergsonIndex:
    """Bergson's compressed index of ``examples`` (response-token mean loss, data labels) over the linear maps of blocks
    ``0..max_block``, with ``projection_dim`` per side, under ``out``: its autocorrelation Hessian pass, then its
    gradient pass."""
    out = Path(out)
    with _quiet_bergson():
        from bergson import collect_gradients
        from bergson.collector.collector import CollectorComputer
        from bergson.config.config import IndexConfig
        from bergson.data import allocate_batches
        from bergson.hessians.autocorrelation import AutocorrelationCollector
        from bergson.utils.worker_utils import processor_for

        model = copy.deepcopy(adapter.model).eval()
        to_ours = map_names_by_module(HFCausalLMAdapter(model, adapter.tokenizer), max_block, model.base_model)
        model.requires_grad_(False)  # as Bergson's setup_model_and_peft: only its hooks' per-module gradients
        model.get_input_embeddings().requires_grad_(True)
        data = _documents(examples, [_response_labels(e) for e in examples])
        cfg = IndexConfig(run_path=str(out / "index"), loss_reduction="mean", precision="fp32",
                          projection_dim=projection_dim, token_batch_size=batch_size * max(data["length"]),
                          max_batch_size=batch_size)
        batches = allocate_batches(data["length"][:], cfg.token_batch_size, max_batch_size=batch_size)
        for path in (out / "index", out / "hessian", cfg.partial_run_path):
            shutil.rmtree(path, ignore_errors=True)
        cfg.partial_run_path.mkdir(parents=True)

        start = time.perf_counter()
        hessian = AutocorrelationCollector(model=model.base_model, data=data, path=str(out / "hessian"),
                                           processor=processor_for(cfg), target_modules=set(to_ours), attention_cfgs={},
                                           filter_modules=None)
        CollectorComputer(model=model, data=data, collector=hessian, batches=batches, cfg=cfg).run_with_collector_hooks(
            desc="Bergson: autocorrelation Hessian")
        hessian_seconds = time.perf_counter() - start

        shutil.rmtree(cfg.partial_run_path)
        cfg.partial_run_path.mkdir(parents=True)
        start = time.perf_counter()
        collect_gradients(model, data, processor_for(cfg), cfg, batches=batches, target_modules=set(to_ours))
        shutil.move(cfg.partial_run_path, cfg.run_path)
        build_seconds = time.perf_counter() - start
    return BergsonIndex(out / "index", out / "hessian", projection_dim, to_ours, hessian_seconds, build_seconds)
