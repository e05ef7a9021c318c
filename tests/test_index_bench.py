"""The index benchmark runs at a tiny size and reports finite figures (no timing assertions), its medical part writes
a row per projection, rank and the default against the exact estimators, and the Bergson index bridge stores what it
says: Bergson's projection of each example's gradient."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from concept_influence.benchmarks.bergson_bridge import bergson_unavailable
from concept_influence.benchmarks.demo_corpus import make_paired_demo_corpus
from concept_influence.benchmarks.index_bench import IndexBenchConfig, run_index_benchmark
from concept_influence.benchmarks.planted_splits import medical_files
from concept_influence.cli import main
from concept_influence.curvature import fit_curvature
from concept_influence.data import write_chat_jsonl
from concept_influence.index import GradientIndex
from concept_influence.models import HFCausalLMAdapter
from conftest import _hf_model

EM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "em"


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


def _medical_slice(folder: Path, n: int = 400) -> Path:
    """The first ``n`` lines of the shared medical files (or, without them, the demo's paired corpus under their
    names): enough prompts for the quick splits."""
    if not all(f.is_file() for f in medical_files(EM)):
        for examples, path in zip(make_paired_demo_corpus(n, seed=0), medical_files(folder)):
            write_chat_jsonl(examples, path)
        return folder
    for source, path in zip(medical_files(EM), medical_files(folder)):
        with gzip.open(source, "rt", encoding="utf-8") as fh:
            lines = [line for _, line in zip(range(n), fh)]
        folder.mkdir(exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.writelines(lines)
    return folder


def test_index_benchmark_medical_part_quick(tmp_path):
    data = _medical_slice(tmp_path / "em")
    assert main(["bench", "index", "--part", "medical", "--quick", "--data", str(data), "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "index.md").exists()  # the GPT-2-shape part and the demo are not run
    report = json.loads((tmp_path / "index-medical.json").read_text())
    assert report["config"]["quick"] and report["planted_config"]["rate"] == 0.1
    (seed,) = report["medical"]
    assert 0 < seed["n_planted"] < seed["n_pool"] and "checkpoints" not in seed
    rows = seed["rows"]
    expected = {("eigen r4", "ekfac"), ("random r4", "ekfac"), ("random r4", "empirical"), ("default", "ekfac")}
    for query in ("concept_influence", "influence_function"):
        mine = [r for r in rows if r["query"] == query]
        assert {(r["variant"], r["curvature"]) for r in mine} == expected and len(mine) == len(expected)
        assert len({r["exact_auroc"] for r in mine}) == 1
        assert all(-1 <= r["spearman"] <= 1 and 0 <= r["auroc"] <= 1 for r in mine)
        assert all(r["rank"] == 4 for r in mine if r["variant"] != "default")
    default = next(r for r in rows if r["variant"] == "default")
    assert default["bytes"] <= report["config"]["budget"]
    text = (tmp_path / "index-medical.md").read_text()
    assert (f"Reproduce: `concept-influence bench index --part medical --data {data} --out benchmarks --quick`"
            in text)
    assert "Machine: " in text and "Data: good_medical_advice.jsonl.gz + bad_medical_advice.jsonl.gz" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[:2] for line in table] == [["| eigen r4", "ekfac"], ["| random r4", "ekfac"],
                                                         ["| random r4", "empirical"], ["| default", "ekfac"]]


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
