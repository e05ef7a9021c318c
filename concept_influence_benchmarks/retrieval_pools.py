"""What the retrieval benchmarks' pool builder (``benchmarks/retrieval_large_pool.py``) writes and its readers
(``retrieval_coverage.py``, ``retrieval_learned.py``) read back: the ``seconds.json`` stages that make up each first
stage's own cost, each design's configuration, and ``pool.json``, the settings that rebuild a pool's chats."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

__all__ = ["ENCODER_INDEX", "FIRST_STAGES", "AUDIT", "audit_corpus", "demo_pool_config", "emergent_pool_config",
           "write_pool_settings", "pool_settings", "settings_config", "pool_examples", "pool_planted"]

#: the ``seconds.json`` stage of the encoders' shared sample index (charged to each encoder)
ENCODER_INDEX = "encoder: index of the sample"
#: first stages a pool folder may hold (``scores/<name>.safetensors``) with the ``seconds.json`` stages of their own
#: cost; the last is the stage the builder times as that first stage's own work
FIRST_STAGES = {"probe_projection": ("fast path",),
                "encoder": (ENCODER_INDEX, "encoder: fit and codes"),
                "encoder[block 0]": (ENCODER_INDEX, "encoder[block 0]: fit and codes")}

#: notebook 07's full-size settings, for ``--design audit``
AUDIT = dict(n_probe=150, n_eval=24, vocab_size=1024, d_model=64, max_length=128, max_new_tokens=40, n_layers=2,
             n_heads=4, epochs=2, lr=2e-3, batch_size=16, fit_share=0.1)


def audit_corpus(n_pool: int, rate: float = 0.05, seed: int = 0, n_probe: int = AUDIT["n_probe"],
                 n_eval: int = AUDIT["n_eval"]):
    """The ``--design audit`` corpus (``make_demo_corpus`` with varied prompts, as notebook 07)."""
    from concept_influence.toy import make_demo_corpus

    return make_demo_corpus(n_pool, rate, n_probe, n_eval, seed, varied=True)


def demo_pool_config(n_pool: int, rate: float, seed: int, quick: bool = False, **sizes):
    """``--design demo``'s :class:`~concept_influence.planted.PlantedConfig`: the demo's, at ``n_pool`` and
    ``rate``, with no behaviour measurement, LDS, concept check or compared query."""
    from concept_influence.demo import demo_config

    return replace(demo_config(quick=quick, seed=seed), n_pool=n_pool, rate=rate, lds=0, retrain=False,
                   concept_check=False, compare_query=None, over_checkpoints=False, **sizes)


def emergent_pool_config(n_pool: int, rate: float, seed: int, quick: bool = False, **sizes):
    """``--design emergent``'s :class:`EmergentConfig`: the default design with varied prompts (``quick``: its
    quick sizes; ``sizes`` override, ``varied_prompts=2`` included)."""
    from .emergent_config import EmergentConfig

    settings = dict(n_pool=n_pool, rate=rate, seed=seed, varied_prompts=True, over_checkpoints=False,
                    curvature_study=False, retrain=False) | sizes
    return EmergentConfig.quick(**settings) if quick else EmergentConfig(**settings)


def write_pool_settings(out: Path, design: str, n_pool: int, rate: float, seed: int, quick: bool = False,
                        planted: list[int] | None = None, **sizes) -> None:
    """``out/pool.json``: the design and the arguments that rebuild the pool's chats (:func:`pool_examples`), and the
    planted labels where the builder has them at hand."""
    settings = {"design": design, "n_pool": n_pool, "rate": rate, "seed": seed, "quick": quick, "sizes": sizes}
    Path(out, "pool.json").write_text(json.dumps(settings | ({"planted": planted} if planted is not None else {}))
                                      + "\n")


def pool_settings(folder: Path) -> dict:
    """``folder/pool.json`` as :func:`write_pool_settings` wrote it, the design's overrides with JSON's lists back as
    the tuples the configs hold."""
    s = json.loads((Path(folder) / "pool.json").read_text())
    s["sizes"] = {key: tuple(v) if isinstance(v, list) else v for key, v in s["sizes"].items()}
    return s


def settings_config(s: dict):
    """The :class:`EmergentConfig` an emergent pool was built with, from its settings (:func:`pool_settings`)."""
    return emergent_pool_config(s["n_pool"], s["rate"], s["seed"], s["quick"], **s["sizes"])


def _emergent_data(s: dict):
    """The emergent design's data (pool and planted labels) rebuilt from a pool's settings."""
    from .emergent_splits import build_emergent_data

    return build_emergent_data(settings_config(s))


def _in_order(folder: Path, by_id: dict, ids: list[str]) -> list:
    """``by_id``'s values in the order of ``ids``; a rebuilt pool that does not match the score file's ids is refused."""
    missing = [i for i in ids if i not in by_id]
    if missing or len(by_id) != len(ids):
        raise ValueError(f"{folder}: the rebuilt pool does not match its score file ({len(missing)} ids missing, "
                         f"first {missing[:1]}; {len(by_id)} rebuilt for {len(ids)} scored)")
    return [by_id[i] for i in ids]


def pool_planted(folder: Path, ids: list[str]) -> np.ndarray:
    """An emergent pool's planted labels (1: the bad answer) in the order of ``ids``, rebuilt from ``folder/pool.json``
    with the same seed."""
    s = pool_settings(folder)
    if s["design"] != "emergent":
        raise ValueError(f"{folder}: planted labels are rebuilt for --design emergent pools only, not {s['design']!r}")
    data = _emergent_data(s)
    return np.array(_in_order(folder, {c.id: flag for c, flag in zip(data.pool, data.planted)}, ids))


def pool_examples(folder: Path, ids: list[str]) -> list:
    """The pool's chats in the order of ``ids`` (a score file's), rebuilt from ``folder/pool.json``; a pool that does
    not match its score file's ids is refused."""
    folder = Path(folder)
    s = pool_settings(folder)
    args = (s["n_pool"], s["rate"], s["seed"])
    if s["design"] == "audit":
        sizes = {key: s["sizes"][key] for key in ("n_probe", "n_eval") if key in s["sizes"]}
        pool = audit_corpus(*args, **sizes).train
    elif s["design"] == "demo":
        from concept_influence.data import load_chats
        from concept_influence.planted.splits import split_planted

        pool = split_planted(load_chats(folder / "data" / "careful.jsonl"), load_chats(folder / "data" / "reckless.jsonl"),
                             demo_pool_config(*args, s["quick"], **s["sizes"])).pool
    else:
        pool = _emergent_data(s).pool
    return _in_order(folder, {c.id: c for c in pool}, ids)
