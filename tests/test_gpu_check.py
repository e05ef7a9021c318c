"""`make gpu-check` (issue 27, item 5) at the tiny size on the CPU: the same code as on the GPU, sizes and device aside.

On the CPU the low-precision comparison is bfloat16 on the CPU against float32 on the CPU (the GPU run compares
bfloat16 on CUDA against float32 on the CPU): both go through the same pipeline, so the tolerances of
concept_influence_benchmarks/lowprecision.py are checked for real, only the device differs. The peak-memory check is
reported and not enforced on the CPU (the plan counts tensors on a device; a tiny run's RSS is mostly the libraries'),
so here its ratio is checked to be computed, not to be near 1."""

import json
import math

import torch

from concept_influence.cli import main
from concept_influence.plan import STAGES
from concept_influence_benchmarks.lowprecision import INFLUENCE_TOLERANCE, MIN_SPEARMAN
from concept_influence_benchmarks.scale_check import make_plan
from concept_influence_benchmarks.scale_model import ScaleConfig, lora_model_on_meta, qwen2_config, scale_adapter
from concept_influence_benchmarks.scale_report import RUN_STAGES


def _two_or_more_partitions() -> tuple[int, int]:
    """The smallest device memory (in steps of 100 kB) for which the tiny preset's plan fits, and its partitions."""
    cfg = ScaleConfig(size="tiny", device="cpu")
    adapter = scale_adapter(lora_model_on_meta(qwen2_config(cfg.preset["model"], cfg.seq_len), 16, torch.bfloat16),
                            cfg.selection)
    for memory in range(10**6, 10**8, 10**5):
        plan = make_plan(adapter, cfg.concept_layer, memory, cfg.batch_size, cfg.seq_len, cfg.examples, "tiny")
        if plan.fits:
            return memory, plan.n_partitions
    raise AssertionError("no device memory up to 100 MB fits the tiny plan")


def test_gpu_check_runs_every_stage_at_tiny_size_on_the_cpu(tmp_path, capsys):
    memory, partitions = _two_or_more_partitions()
    assert partitions >= 2
    code = main(["bench", "gpu-check", "--size", "tiny", "--device", "cpu", "--device-memory", str(memory),
                 "--out", str(tmp_path), "--quiet"])
    result = json.loads((tmp_path / "gpu-check-tiny-cpu.json").read_text())
    assert code == 0 and result["passed"], result["checks"]
    printed = capsys.readouterr().out
    assert "FAILED" not in printed and "missed (not enforced): the peak" in printed
    assert "ok: low precision agrees with float32" in printed

    # the plan, made before the run, with its numbers per stage
    plan = result["plan"]
    assert plan["fits"] and plan["partitions"] == partitions and plan["device_memory"] == memory
    assert [st["stage"] for st in plan["stages"]] == list(STAGES) and all(st["device"] > 0 for st in plan["stages"])

    # every stage ran (each pass once per partition), measured beside the plan, with the ratio computed
    rows = {r["stage"]: r for r in result["stages"]}
    for stage in RUN_STAGES:
        r = rows[stage]
        assert r["runs"] == (partitions if stage in ("covariance pass", "eigendecomposition", "eigenvalue pass") else 1)
        assert r["seconds"] >= 0 and r["measured_bytes"] is not None and r["planned_bytes"] > 0
        # (peak RSS above the process's own: a small stage can stay within pages the process already holds, 0 bytes)
        assert math.isclose(r["ratio"], r["measured_bytes"] / r["planned_bytes"]) and r["ratio"] >= 0
    assert rows["index build"]["runs"] == 0 and rows["index build"]["ratio"] is None
    assert result["scores"]["n"] == 16 and result["scores"]["std"] > 0
    assert result["model"]["tracked_maps"] == 2 * 14  # 7 LoRA-adapted maps x (lora_A, lora_B) x 2 blocks

    # the low-precision path against float32, within the tests' own tolerances
    c = result["comparison"]
    assert c["passed"] and c["compared"] == "bfloat16 on cpu vs float32 on cpu" and result["comparison_wide"] is None
    assert 0 < c["relative_error"] <= INFLUENCE_TOLERANCE["bfloat16"] and c["spearman"] >= MIN_SPEARMAN
    checks = {ch["name"]: ch for ch in result["checks"]}
    assert not checks["the peak within 15% of the plan's"]["enforced"]
    assert all(ch["passed"] for ch in result["checks"] if ch["enforced"])
    table = (tmp_path / "gpu-check-tiny-cpu.md").read_text()
    assert "| stage | seconds | runs | measured peak | planned | measured / planned |" in table
    assert "| covariance pass |" in table and "**passed**" in table


def test_a_plan_that_does_not_fit_stops_the_check_before_any_work(tmp_path):
    code = main(["bench", "gpu-check", "--size", "tiny", "--device", "cpu", "--device-memory", "10kB",
                 "--out", str(tmp_path), "--quiet"])
    result = json.loads((tmp_path / "gpu-check-tiny-cpu.json").read_text())
    assert code == 1 and not result["passed"] and not result["plan"]["fits"]
    assert [ch["name"] for ch in result["checks"]] == ["the plan fits"]
    assert all(r["runs"] == 0 for r in result["stages"]) and result["scores"] is None
    assert "does not fit" in result["checks"][0]["detail"]


def test_a_stage_that_fails_is_reported_with_its_name_and_the_check_fails(tmp_path, monkeypatch):
    from concept_influence_benchmarks import scale_check

    def out_of_memory(examples):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")

    monkeypatch.setattr(scale_check, "fit_partitioned",
                        lambda *args, accumulate, **kwargs: accumulate("covariance", out_of_memory))
    code = main(["bench", "gpu-check", "--size", "tiny", "--device", "cpu", "--no-compare", "--out", str(tmp_path),
                 "--quiet"])
    result = json.loads((tmp_path / "gpu-check-tiny-cpu.json").read_text())
    assert code == 1 and result["error"] == ("covariance pass: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                             "2.00 GiB")
    checks = {ch["name"]: ch for ch in result["checks"]}
    assert not checks["every stage ran"]["passed"] and checks["every stage ran"]["detail"] == result["error"]
    assert not checks["the scores are finite and not all zero"]["passed"] and result["comparison"] is None
    rows = {r["stage"]: r for r in result["stages"]}
    assert rows["load"]["runs"] == 1 and rows["covariance pass"]["runs"] == 1 and rows["scoring"]["runs"] == 0


def test_the_stage_meter_on_cuda_reads_the_peak_reset_per_stage(monkeypatch):
    """The CUDA branch of the meter, with torch.cuda's counters replaced (no device here): the peak is reset at each
    stage's start and read at its end; a stage run once per partition adds its seconds and keeps its largest peak; the
    fit's passes and the eigendecomposition between them are stages of their own."""
    from concept_influence_benchmarks.scale_check import StageMeter

    peaks, calls = iter([5, 50, 7, 70, 3, 30, 9, 90, 6, 60, 4, 40]), []  # (allocated, reserved) per stage run
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: next(peaks))
    meter = StageMeter(torch.device("cuda", 0))
    assert meter.baseline is None
    seen = []
    run = meter.accumulate(["a", "b"])
    for _ in range(2):  # two partitions
        assert run("covariance", lambda ex: seen.append(("covariance", list(ex))) or "stats") == "stats"
        run("eigenvalues", lambda ex: seen.append(("eigenvalues", meter.current[0])))
    assert seen == [("covariance", ["a", "b"]), ("eigenvalues", "eigenvalue pass")] * 2
    assert list(meter.stages) == ["covariance pass", "eigendecomposition", "eigenvalue pass"]
    cov = meter.stages["covariance pass"]
    assert cov["runs"] == 2 and cov["measured_bytes"] == cov["peak_bytes"] == 9 and cov["reserved_bytes"] == 90
    assert meter.stages["eigendecomposition"]["measured_bytes"] == 7 and calls.count("reset") == 6
