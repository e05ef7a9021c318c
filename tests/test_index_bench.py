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

from concept_influence.cli import main
from concept_influence.curvature import fit_curvature
from concept_influence.data import write_chat_jsonl
from concept_influence.index import GradientIndex
from concept_influence.models import HFCausalLMAdapter
from concept_influence.planted.splits import medical_files
from concept_influence.toy.demo_corpus import make_paired_demo_corpus
from concept_influence_benchmarks.bergson_bridge import bergson_unavailable
from concept_influence_benchmarks.index_bench import IndexBenchConfig, run_index_benchmark
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

    from concept_influence_benchmarks.bergson_index import build_bergson_index

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


def _fake_study(seed: int) -> dict:
    """A seed's study as :func:`index_study` returns it (the default row only), its values told by ``seed``."""
    rows = [{"variant": "default", "curvature": "ekfac", "query": q, "rank": 34, "bytes": 64896, "spearman": 0.9 + seed / 100,
             "auroc": 0.8, "exact_auroc": 0.81 + seed / 100} for q in ("concept_influence", "influence_function")]
    return {"n_pool": 10, "n_planted": 2, "full_bytes": 1 << 20, "rows": rows,
            "checkpoints": {"spearman": 0.9, "auroc": 0.8, "exact_auroc": 0.8}}


def test_more_medical_seeds_keep_the_seeds_already_reported(tmp_path, monkeypatch, capsys):
    from concept_influence_benchmarks import index_bench_medical as medical

    data, ran = _medical_slice(tmp_path / "em", 40), []
    monkeypatch.setattr(medical, "planted_setup", lambda *args: args[2].seed)
    monkeypatch.setattr(medical, "index_study", lambda seed, *args, **kw: ran.append(seed) or _fake_study(seed))

    def cfg(seeds, **kw):
        c = IndexBenchConfig(quick=True)
        for key, value in {"seeds": seeds, **kw}.items():
            setattr(c, key, value)  # quick sets its own
        return c

    medical.run_index_medical(tmp_path, data, cfg(2))
    first = json.loads((tmp_path / "index-medical.json").read_text())
    medical.run_index_medical(tmp_path, data, cfg(3))
    assert ran == [0, 1, 2]  # seeds 0 and 1 were not run again
    report = json.loads((tmp_path / "index-medical.json").read_text())
    assert report["medical"][:2] == first["medical"] and report["machine"] == first["machine"]
    assert report["total_seconds"] >= first["total_seconds"]
    text = (tmp_path / "index-medical.md").read_text()
    assert "--seeds 3" not in text and "3 seed(s)" in text  # quick: the command says --quick
    assert "Spearman median 0.910, worst 0.900, spread 0.020 (0.900 / 0.910 / 0.920)" in text
    assert "AUROC minus the exact estimator's median -0.020, worst -0.030, spread 0.020" in text
    assert report["invocations"] == 2 and "Made in 2 runs on this machine" in text
    medical.run_index_medical(tmp_path, data, cfg(3))  # nothing to add: nothing run, the report unchanged
    assert ran == [0, 1, 2] and json.loads((tmp_path / "index-medical.json").read_text())["invocations"] == 2
    medical.run_index_medical(tmp_path, data, cfg(3, budget=8192))  # other settings: every seed again
    assert ran == [0, 1, 2, 0, 1, 2] and "made with other settings (config); starting again" in capsys.readouterr().out


def test_more_demo_seeds_keep_the_real_shape_part_and_the_seeds_done(tmp_path, monkeypatch):
    from concept_influence_benchmarks import index_bench, index_bench_demo

    cfg = IndexBenchConfig(quick=True, bergson=False)
    cfg.seeds, cfg.rows, cfg.n_examples = 0, (300,), 8
    first = run_index_benchmark(tmp_path, cfg)
    ran = []
    monkeypatch.setattr(index_bench, "size_study", lambda *a: pytest.fail("the real-shape part was run again"))
    monkeypatch.setattr(index_bench_demo, "demo_study", lambda seed, *a: ran.append(seed) or _fake_study(seed))
    for seeds in (1, 2):
        again = IndexBenchConfig(quick=True, bergson=False)
        again.seeds, again.rows, again.n_examples = seeds, (300,), 8
        report = run_index_benchmark(tmp_path, again)
    assert ran == [0, 1] and report["size"] == json.loads(json.dumps(first["size"]))
    saved = json.loads((tmp_path / "index.json").read_text())
    assert saved["config"]["seeds"] == 2 and len(saved["demo"]) == 2 and saved["streamed"] == report["streamed"]
    assert "The default index over 2 seeds" in (tmp_path / "index.md").read_text()


def test_rank_curve_script_reaches_the_exact_scores_when_the_projection_is_square(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "index_rank_curve.py"
    spec = importlib.util.spec_from_file_location("index_rank_curve", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.SHARE_RANKS = (2, 4)
    script.main(IndexBenchConfig(quick=True), eigen_ranks=(4, 256), random_ranks=(4,))
    text = capsys.readouterr().out
    assert text.startswith("# How large an index must be")  # progress goes to stderr, not into the report
    lines = [line.split(" | ") for line in text.splitlines() if line.startswith(("| eigen", "| random"))]
    rows = {(cells[0].strip("| "), int(cells[1])): cells for cells in lines}
    assert set(rows) == {("eigen", 4), ("eigen", 256), ("random", 4)}
    exact = rows[("eigen", 256)]  # 256 ≥ every side of the tiny model's maps: the projection is a rotation
    assert float(exact[4].split(" (")[1].rstrip(")")) > 0.99 and float(exact[5].strip(" |")) > 0.99
    assert "| S (output gradients) |" in text and "| flat, d = 64 | 0.031 | 0.062 |" in text
