"""The probe stage: the run's concept direction, trained here on ``[probe] positive`` vs ``negative`` texts or read from
``[probe] direction``, written to ``probe/direction.safetensors`` (and ``probe/metrics.json`` when trained)."""

from __future__ import annotations

import json
from pathlib import Path

from probes import ConceptDirection, train_probe

from ..activations import collect_activations
from ..concept_spec import steering_direction
from ..concepts import check_direction_compatible
from ..config import MIN_PROBE_AUROC
from ..fileio import atomic_write_text, refuse_same_data
from .folder import RunError, write_or_explain

__all__ = ["probe_stage"]


def probe_stage(pipeline) -> ConceptDirection:
    """The direction of ``pipeline``'s run (made once, on rank 0; a direction saved just before a kill is kept); for a
    run without a ``[probe]``, the direction its concept check steers along."""
    run, ranks = pipeline.run, pipeline.ranks
    if pipeline.cfg.probe is None:
        return steering_direction(run.concept_spec, pipeline.adapter)
    path = run.direction_path
    if ranks.is_main and not run.is_done("probe"):
        details = {} if path.is_file() else _make_direction(pipeline, path)
        run.finish_stage("probe", ranks, hook=pipeline.cfg.probe.hook, **details)
    ranks.barrier()
    direction = ConceptDirection.load(path)
    check_direction_compatible(direction, pipeline.adapter)
    return direction


def _make_direction(pipeline, path: Path) -> dict:
    p, adapter = pipeline.cfg.probe, pipeline.adapter
    if p.direction is not None:
        direction, details = ConceptDirection.load(p.direction), {"source": p.direction}
        if direction.hook_name != p.hook:
            raise RunError(f"{p.direction}: the direction is for hook {direction.hook_name!r}, "
                           f"the config says probe.hook = {p.hook!r}")
        check_direction_compatible(direction, adapter)
    else:
        adapter.check_hook(p.hook)
        refuse_same_data(("probe.positive", p.positive), ("probe.negative", p.negative),
                         "the probe needs texts with and without the concept", RunError)
        acts = [collect_activations(adapter, pipeline._tokenize(f, p.max_examples), p.hook, p.reduction,
                                    progress=pipeline.progress) for f in (p.positive, p.negative)]
        result = train_probe(p.kind, *acts, p.hook, seed=p.seed)
        m = result.metrics
        if m["roc_auc"] < MIN_PROBE_AUROC and not p.allow_weak:
            raise RunError(f"the probe at {p.hook} is at chance: held-out AUROC {m['roc_auc']:.2f} (accuracy "
                           f"{m['accuracy']:.2f}) between {p.positive} and {p.negative}, below {MIN_PROBE_AUROC}; "
                           "check that the two files differ in the concept, or set probe.allow_weak = true "
                           "(--allow-weak-probe) to go on. Nothing was written")
        direction, details = result.direction, {"metrics": m}
        atomic_write_text(path.parent / "metrics.json", json.dumps(m, indent=1) + "\n")
    write_or_explain(path, lambda: direction.save(path), "Nothing else was written.")
    return details
