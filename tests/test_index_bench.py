"""The index benchmark runs at a tiny size and reports finite figures (no timing assertions), and the Bergson index
bridge stores what it says: Bergson's projection of each example's gradient."""

import json
import math

import numpy as np
import pytest
import torch

from concept_influence.benchmarks.bergson_bridge import bergson_unavailable
from concept_influence.benchmarks.index_bench import IndexBenchConfig, run_index_benchmark
from concept_influence.curvature import fit_curvature
from concept_influence.index import GradientIndex
from concept_influence.models import HFCausalLMAdapter
from conftest import _hf_model


def test_index_benchmark_quick_without_the_demo(tmp_path):
    cfg = IndexBenchConfig(quick=True, bergson=False)
    cfg.seeds, cfg.rows, cfg.n_examples = 0, (300,), 8
    report = run_index_benchmark(tmp_path, cfg)
    size = report["size"]
    assert set(size["variants"]) == {"eigen", "random", "eigen float32"}
    for row in size["variants"].values():
        assert row["bytes"] <= cfg.budget and row["build_seconds"] > 0
        assert all(math.isfinite(r) for r in row["spearman_concept_influence"] + row["spearman_influence_function"])
    assert [t["k"] for t in report["streamed"]] == [1, cfg.many] and all(t["warm_seconds"] > 0 for t in report["streamed"])
    text = (tmp_path / "index.md").read_text()
    assert "Reproduce: `concept-influence bench index --out benchmarks --quick`" in text and "| ours, eigen |" in text
    assert json.loads((tmp_path / "index.json").read_text())["config"]["bergson"] is False


@pytest.mark.skipif(bergson_unavailable() is not None, reason=str(bergson_unavailable()))
def test_bergson_index_stores_its_projection_of_our_gradients(tmp_path, tokenizer, tokenized):
    from bergson.collector.collector import create_module_projection_matrix
    from bergson.data import column_offsets, load_gradients

    from concept_influence.benchmarks.bergson_index import build_bergson_index

    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    curvature = fit_curvature(adapter, tokenized, adapter.linear_maps(0), batch_size=4, progress=False)
    ours = GradientIndex.build(tmp_path / "ours", adapter, tokenized, curvature, projection="identity", dtype="float32",
                               progress=False)
    theirs = build_bergson_index(adapter, tokenized, 0, 4, tmp_path / "bergson")
    assert theirs.bytes_per_example() == 4 * 16 * len(ours.maps)
    rows, stored = np.array(ours.store.rows(0, 0)[1]), load_gradients(theirs.path)
    layout = {e["name"]: e for e in ours.store.manifest["maps"]}
    spaces = {s.name: s for s in ours.store.load_spaces(0)}
    columns = column_offsets(json.loads((theirs.path / "info.json").read_text())["grad_sizes"])
    for name, mine in theirs.to_ours.items():
        e = layout[mine]
        d_out, d_in = e["shape"]
        grads = torch.from_numpy(rows[:, e["offset"]:e["offset"] + e["dim"]]).view(-1, d_out, d_in) / spaces[mine].scale
        left, right = (create_module_projection_matrix(name, role, 4, d, torch.float32, "cpu", "rademacher", "jl", None)
                       for role, d in (("left", d_out), ("right", d_in)))
        expected = (left @ grads @ right.T).flatten(1).numpy()
        got = np.asarray(stored[:, slice(*columns[name])], dtype=np.float64)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), name
