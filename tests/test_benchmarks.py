"""The speed benchmark runs and reports finite positive figures (no timing assertions), and kronfluence
agrees with our Concept Influence on a tiny model when it is installed."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from concept_influence.benchmarks import kronfluence_concept_scores, run_speed_benchmark
from concept_influence.concepts import ConceptFunction
from concept_influence.estimators import ConceptInfluence
from concept_influence.models import HFCausalLMAdapter
from conftest import _hf_model
from probes import ConceptDirection


def test_speed_benchmark_quick(tmp_path):
    results = run_speed_benchmark(tmp_path, quick=True, kronfluence=False)
    saved = json.loads((tmp_path / "speed.json").read_text())
    report = (tmp_path / "speed.md").read_text()
    assert saved["command"] == results["command"] and results["command"] in report
    assert "| probe_projection speed-up over full scoring" in report
    part_a = saved["part_a"]
    figures = list(part_a["ratios"].values()) + [part_a["query_gradient_seconds"]]
    for stage in part_a["stages"].values():
        figures += [stage["seconds_per_1k_examples"], stage["tokens_per_second"]]
    figures += [m[key] for m in saved["memory"].values() if m is not None for key in ("peak_mib", "increase_mib")]
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    assert set(saved["memory"]) == set(part_a["stages"])
    assert "error" in saved["part_b"]  # kronfluence=False


def test_kronfluence_agrees(tmp_path, tokenizer, tokenized):
    pytest.importorskip("kronfluence")
    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    direction = ConceptDirection(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)),
                                 "blocks.0.hook_resid_post")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:4])
    ours = ConceptInfluence(concept, "ekfac").score(adapter, tokenized, batch_size=4, progress=False).column(0)
    kron = kronfluence_concept_scores(adapter, tokenized, concept, tmp_path / "kronfluence", batch_size=4,
                                      query_modes=("aggregated", "per_query"))
    for mode, scores in kron["scores"].items():  # the same numbers up to float rounding, sign included
        assert spearmanr(ours, scores).statistic >= 0.9, mode
        np.testing.assert_allclose(scores, ours, rtol=0, atol=1e-3 * np.abs(ours).max(), err_msg=mode)


def test_size_benchmark_counts_flops_against_the_floor(tmp_path):
    """The size benchmark on the tiny shape: every stage reported, FLOP ratios that follow from the arithmetic (a
    training step is forward + full backward = 1.5 × forward + activation-only backward; the fast path stops early),
    low-rank scoring cheaper than full rank, and kronfluence agreeing with ours."""
    from concept_influence.benchmarks.speed_sizes import SizeConfig, run_size_benchmark

    cfg = SizeConfig(size="tiny", n_examples=8, seq_len=16, batch_size=4, concept_layer=1, n_eval=2, many_concepts=3,
                     query_rank=2, threads=1)
    report = run_size_benchmark(tmp_path, cfg)
    stages = report["stages"]
    assert list(stages) == ["floor", "train_step", "ekfac_fit", "concept_influence_k1", "concept_influence_k3",
                            "concept_influence_k1_lowrank", "concept_influence_k3_lowrank", "probe_projection",
                            "kronfluence_k1"]
    flop = {name: entry["flops_per_example"] / stages["floor"]["flops_per_example"] for name, entry in stages.items()}
    assert 1.4 < flop["train_step"] < 1.6
    assert flop["probe_projection"] < 0.9 < flop["concept_influence_k1_lowrank"] < flop["concept_influence_k1"]
    assert stages["concept_influence_k1_lowrank"]["spearman_vs_full_rank"] > 0.5
    assert stages["kronfluence_k1"]["spearman_vs_ours"] > 0.99
    assert all(entry["seconds"] > 0 for entry in stages.values())
    text = (tmp_path / "speed-tiny.md").read_text()
    assert "**floor**" in text and "vs ours" in text and json.loads((tmp_path / "speed-tiny.json").read_text())["stages"]
