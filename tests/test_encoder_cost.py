"""The encoder-cost benchmark (issue 28, benchmarks/encoder_cost.py) at a tiny shape: every pass is timed and counted
against the floor, the encoder reading fewer blocks costs less, and the report holds every row."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("encoder_cost", ROOT / "benchmarks" / "encoder_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encoder_cost_measures_each_pass_against_the_floor(tmp_path):
    script = _script()
    out = tmp_path / "encoder-cost.md"
    results = script.main(["--quick", "--out", str(out)])
    costs = results["costs"]
    assert list(costs) == ["floor", "encode, blocks 0..1", "forward to block 1", "encode, blocks 0..0",
                           "forward to block 0", "fast path", "exact Concept Influence"]
    floor = costs["floor"]
    for name, row in costs.items():
        assert len(row["runs"]) == 2 and all(r > 0 and math.isfinite(r) for r in row["runs"]), name
        assert 0 < row["seconds"] / floor["seconds"] < math.inf and 0 < row["flops"] / floor["flops"] < math.inf, name
    flops = {name: row["flops"] for name, row in costs.items()}
    # reading block 0 alone stops the forward earlier: fewer FLOPs than reading every indexed block, as its forward
    assert flops["encode, blocks 0..0"] < flops["encode, blocks 0..1"]
    assert flops["forward to block 0"] < flops["forward to block 1"] < flops["floor"] < flops["exact Concept Influence"]
    for block in (0, 1):  # the encoder's own arithmetic comes on top of its forward
        assert flops[f"encode, blocks 0..{block}"] > flops[f"forward to block {block}"]
    assert flops["fast path"] == pytest.approx(flops["forward to block 1"], rel=0.05)
    assert costs["encode, blocks 0..0"]["seconds"] < costs["exact Concept Influence"]["seconds"]
    assert set(results["encoder_fits"]) == {0, 1} and results["facts"]["code_bytes"] == 16
    text = out.read_text()
    for row in ("| floor |", "| encode, blocks 0..1 (every indexed block) |", "| encode, block 0 only |",
                "| fast path (forward to the concept's block 1) |", "| exact Concept Influence |"):
        assert row in text, row
    assert "python benchmarks/encoder_cost.py --quick" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["costs"] == costs and saved["seconds"] > 0
    out.unlink()
    script.main(["--quick", "--out", str(out), "--report-only"])  # the report again from the .json alone
    assert out.read_text() == text
