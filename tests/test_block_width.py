"""The block-width benchmark (issue 27, item 6) at 1/64 of Qwen2.5-7B's width: each configuration in a fresh process,
planned in partitions, every stage run and measured beside the plan, results kept across invocations."""

import json
import subprocess

import torch

from concept_influence.cli import main
from concept_influence.models import MapSelection
from concept_influence_benchmarks import block_width
from concept_influence_benchmarks.block_width import DATA, WIDTHS
from concept_influence_benchmarks.scale_check import make_plan
from concept_influence_benchmarks.scale_model import lora_model_on_meta, qwen2_config, scale_adapter
from concept_influence_benchmarks.scale_report import RUN_STAGES


def _memory_for_two_partitions(weights: str) -> int:
    """The smallest host memory (steps of 100 kB) whose plan of the 1/64-width block fits, and cuts it in two or more."""
    keys = {**WIDTHS["1/64"], "num_hidden_layers": 1, "vocab_size": DATA["vocab_size"]}
    adapter = scale_adapter(lora_model_on_meta(qwen2_config(keys, DATA["seq_len"]), 16, torch.float32), MapSelection(),
                            weights)
    for memory in range(10**6, 10**9, 10**5):
        plan = make_plan(adapter, 0, memory, DATA["batch_size"], DATA["seq_len"], DATA["examples"], "test")
        if plan.fits:
            assert plan.n_partitions >= 2
            return memory
    raise AssertionError("no memory up to 1 GB fits")


def test_block_width_measures_each_stage_beside_the_plan_and_resumes(tmp_path, monkeypatch, capsys):
    memory = {weights: _memory_for_two_partitions(weights) for weights in ("lora", "full")}
    for weights in ("lora", "full"):
        assert main(["bench", "block-width", "--widths", "1/64", "--weights", weights, "--memory", str(memory[weights]),
                     "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "block-width.json").read_text())
    assert set(results) == {"lora@1/64", "full@1/64"}
    for r in results.values():
        assert r["fits"] and r["scores_finite"] and r["d_model"] == 56 and r["d_mlp"] == 296
        assert [s["stage"] for s in r["stages"]] == list(RUN_STAGES)
        assert all(s["measured_bytes"] > 0 and s["planned_bytes"] > 0 and s["seconds"] > 0 for s in r["stages"])
        assert r["planned_peak"] == max(s["planned_bytes"] for s in r["stages"])
        assert r["peak_ratio"] == r["measured_peak"] / r["planned_peak"]
    for r in results.values():
        assert r["partitions"] >= 2 and r["stages"][1]["runs"] == r["partitions"]  # a covariance pass each
    report = (tmp_path / "block-width.md").read_text()
    assert "| 1/64 | lora | 56 / 296 |" in report and "| 1/64 | full | 56 / 296 |" in report

    def no_process(*args, **kwargs):
        raise AssertionError("a configuration already measured was run again")

    monkeypatch.setattr(subprocess, "run", no_process)
    assert block_width.run_block_width(tmp_path, ("1/64",), ("lora", "full"), "1GB") == results
