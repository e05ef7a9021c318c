"""The row-encoder study's committed tables are what its report makes of the committed results (the two-block study
and the six-block one), so a table cannot drift from the numbers behind it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("name, depth", [("encoder", 2), ("encoder-6-blocks", 6)])
def test_committed_encoder_tables_regenerate_from_their_results(name, depth):
    spec = importlib.util.spec_from_file_location("encoder_study", BENCHMARKS / "encoder_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    results = json.loads((BENCHMARKS / f"{name}.json").read_text())
    assert all(d.get("n_layers", 2) == depth for d in results["designs"])
    assert study.report(results) == (BENCHMARKS / f"{name}.md").read_text()
