"""The memory plan before a run (issue 27, item 1): the formulas at the paper's shapes (meta device), partitions that
fit, shapes read from configs equal to the real model's, the `plan` command, and a run that stops before any work."""

from __future__ import annotations

import json
import warnings

import pytest

from concept_influence.config import ConfigError, RunConfig
from concept_influence.plan import (
    MapShape,
    ModelShape,
    PlanError,
    format_bytes,
    model_shape,
    paper_config,
    parse_bytes,
    plan_memory,
)

GB80 = 80 * 10**9
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def qwen():
    return model_shape(paper_config("Qwen2.5-7B"))


@pytest.fixture(scope="module")
def qwen_lora():
    return model_shape(paper_config("Qwen2.5-7B"), lora_rank=16)


def test_qwen_7b_numbers_of_the_issue(qwen):
    """All 7 maps × 28 blocks in float32: 133.6 GB of covariances, as many of eigenvectors, 26.1 GB of eigenvalues,
    about 290 GB at the eigendecomposition when every factor stays on the device (today's engine)."""
    d, i, kv = 3584, 18944, 512
    per_block = 2 * (d * d + d * d) + 2 * (d * d + kv * kv) + 3 * (d * d + i * i)
    plan = plan_memory(qwen, engine="current")
    assert len(qwen.maps) == 7 * 28 and qwen.dtype == "bfloat16"
    assert plan.totals["covariances"] == 4 * 28 * per_block
    assert format_bytes(plan.totals["covariances"]) == "133.6 GB" == format_bytes(plan.totals["eigenvectors"])
    assert format_bytes(plan.totals["eigenvalues"]) == "26.1 GB"
    assert format_bytes(plan.totals["query"]) == "26.1 GB"  # a concept's query: d_out·d_in per map
    eig = next(st for st in plan.stages if st.stage == "eigendecomposition")
    weights = qwen.weight_bytes
    assert eig.device == weights + 2 * plan.totals["covariances"] + 32 * i * i  # float64 input, eigenvectors, 2n² work
    assert 285e9 < eig.device - weights + 15e9 < 295e9
    assert plan.n_partitions == 1 and plan.fits  # no limit: no partitions


def test_lora_keeps_the_large_side(qwen_lora):
    maps = {m.name: m for m in qwen_lora.maps}
    a, b = maps["blocks.0.mlp.down_proj.lora_A.default"], maps["blocks.0.mlp.down_proj.lora_B.default"]
    assert (a.d_out, a.d_in) == (16, 18944) and (b.d_out, b.d_in) == (3584, 16)
    assert a.covariance_elements() == 18944**2 + 16**2 and b.covariance_elements() == 3584**2 + 16**2
    plan = plan_memory(qwen_lora)
    assert format_bytes(plan.totals["covariances"]) == "133.6 GB"  # as large as for the base weights
    assert plan.totals["eigenvalues"] < 0.2e9


def _check_partitions(plan):
    """Every rank's partitions cover its maps once, in model order, and each partition's passes fit."""
    from concept_influence.plan.memory import _Costs

    c = _Costs(plan.model, plan.settings)
    by_name = {m.name: m for m in plan.model.maps}
    seen = []
    for parts in plan.partitions:
        flat = [n for p in parts for n in p]
        order = [m.name for m in plan.model.maps if m.name in set(flat)]
        assert flat == order
        seen += flat
        for p in parts:
            for stage, b, _ in c.passes([by_name[n] for n in p]):
                assert b <= plan.settings.device_limit, (stage, b)
    assert sorted(seen) == sorted(by_name)


def test_qwen_7b_lora_fits_one_80gb_gpu_with_partitions(qwen_lora):
    plan = plan_memory(qwen_lora, device_memory=GB80)
    assert plan.fits, plan.failure
    assert plan.n_partitions > 1 and plan.factor_passes == 2 * plan.n_partitions
    assert all(st.device <= 0.9 * GB80 for st in plan.stages)
    _check_partitions(plan)
    today = plan_memory(qwen_lora, device_memory=GB80, engine="current")
    assert not today.fits and today.failure.startswith("covariance pass: ")
    with pytest.raises(PlanError, match=r"^covariance pass: \d+\.\d GB on the device > 72\.0 GB usable of 80\.0 GB"):
        today.check()
    eight = plan_memory(qwen_lora, device_memory=GB80, world_size=8)
    assert eight.fits and eight.n_partitions < plan.n_partitions
    _check_partitions(eight)
    assert "partition 0" in plan.describe() and "| covariance pass |" in plan.table()


def test_llama_3_70b_fits_eight_80gb_gpus():
    shape = model_shape(paper_config("Llama-3-70B"))
    assert len(shape.maps) == 7 * 80
    plan = plan_memory(shape, device_memory=GB80, world_size=8, batch_size=1)
    assert plan.fits, plan.failure
    _check_partitions(plan)
    assert plan.query_rank is not None  # the full-size query (274 GB) fits no device: a low-rank one is chosen
    big = plan_memory(shape, device_memory=GB80, world_size=8, batch_size=8)
    assert not big.fits and "activations of 8 × 512 tokens" in big.failure
    assert not plan_memory(shape, device_memory=GB80, world_size=1, batch_size=1).fits


def test_parse_and_format_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80GB") == GB80 and parse_bytes("1.5 MB") == 1_500_000
    assert parse_bytes(123) == 123 and parse_bytes(None) is None and parse_bytes("512") == 512
    for bad in ("80 gigs", "GB", "-1GB"):
        with pytest.raises(PlanError, match="cannot read the size"):
            parse_bytes(bad)
    assert format_bytes(133.6e9) == "133.6 GB" and format_bytes(12) == "12 B"


def test_a_dict_of_shapes():
    shape = ModelShape.from_dict({"name": "toy", "maps": {"blocks.0.mlp.W_in": [64, 16], "blocks.1.mlp.W_out": [16, 64]},
                                  "weight_bytes": 10_000, "block_weight_bytes": 5_000, "n_blocks": 2, "d_model": 16,
                                  "d_mlp": 64, "vocab": 100})
    assert shape.maps[1] == MapShape("blocks.1.mlp.W_out", 1, 16, 64)
    plan = plan_memory(shape, batch_size=1, max_length=4)
    assert plan.totals["covariances"] == 2 * 4 * (64**2 + 16**2)


def test_shapes_from_saved_folders_equal_the_real_models(tmp_path, tokenizer):
    """The meta-device shapes read from a saved folder's config are the loaded model's shapes."""
    from concept_influence.models import HFCausalLMAdapter, save_model
    from concept_influence.toy.small_model import build_small_model
    from conftest import _hf_model

    for name, adapter in (("tl", build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)),
                          ("llama", HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)),
                          ("gpt2", HFCausalLMAdapter(_hf_model("gpt2", len(tokenizer)), tokenizer))):
        save_model(adapter, tmp_path / name)
        meta = model_shape(tmp_path / name, select={"kinds": ["mlp"]})
        real = ModelShape.from_adapter(adapter, adapter.linear_maps(select="mlp"), name=name)
        assert meta == real, name
        assert model_shape(tmp_path / name, max_block=0).maps == \
            ModelShape.from_adapter(adapter, adapter.linear_maps(0)).maps
    with pytest.raises(PlanError, match="no config.json"):
        model_shape(tmp_path)


def _project(tmp_path, extra: str = ""):
    from runfolder import make_project

    project = make_project(tmp_path / "p", n_train=16)
    toml = (project / "run.toml").read_text().replace('path = "model"', f'path = "model"\n{extra}')
    (project / "run.toml").write_text(toml)
    return project


def test_plan_command_on_a_run_config(tmp_path, capsys):
    from concept_influence.cli import main

    project = _project(tmp_path, 'track = "mlp"')
    assert main(["plan", str(project / "run.toml"), "--device-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "2 maps" in out and "| eigendecomposition |" in out and "16 examples scored" in out
    assert "per batch: 8 × 128 tokens" in out  # [factors] batch_size and [data] max_length
    assert main(["plan", str(project / "run.toml"), "--device-memory", "1kB"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", str(project / "model"), "--blocks", "3"]) == 2
    assert "blocks: block 3 has no linear map" in capsys.readouterr().err
    assert main(["plan", str(project / "model"), "--device-memory", "lots"]) == 2
    assert main(["plan", str(project / "run.toml"), "--strategy", "identity"]) == 2  # (the registry's names)
    assert "strategy must be one of ekfac, kfac, got 'identity'" in capsys.readouterr().err


def test_a_run_that_does_not_fit_stops_before_any_work(tmp_path):
    from concept_influence.runs import RunError, run_config, run_stages

    project = _project(tmp_path, 'device_memory = "300kB"')
    config = RunConfig.read(project / "run.toml")
    with pytest.raises(RunError, match=r"the run does not fit the device: covariance pass needs [\d.]+ [kM]B on the "
                                       r"device, 270\.0 kB usable of 300\.0 kB \(\[model\] device_memory = '300kB'\)"):
        run_config(config, project / "runs" / "small", progress=False)
    assert not (project / "runs" / "small").exists()
    run_stages(("probe",), project / "runs" / "small", config, progress=False)  # a stage the plan does not cover
    assert (project / "runs" / "small" / "probe").is_dir()
    # the limit is a gate: the folder takes a new value, and the run goes on
    (project / "run.toml").write_text((project / "run.toml").read_text().replace('"300kB"', '"2GB"'))
    run_stages(("factors",), project / "runs" / "small", RunConfig.read(project / "run.toml"), progress=False)
    saved = json.loads((project / "runs" / "small" / "factors" / "curvature.json").read_text())
    assert len(saved["maps"]) == 6
    with pytest.raises(ConfigError, match="device_memory.*cannot read the size"):
        RunConfig.from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "device_memory": "big"}})


def test_the_check_covers_the_stages_a_run_computes(tmp_path):
    from concept_influence.runs import RunError, check_memory_plan

    project = _project(tmp_path, 'device_memory = "300kB"')
    config = RunConfig.read(project / "run.toml")
    check_memory_plan(None, config, ("probe", "check", "report"))  # nothing planned: no error
    with pytest.raises(RunError, match="covariance pass"):
        check_memory_plan(None, config, ("factors",))
    config.factors.path = str(project / "saved-factors")  # a saved curvature is read, not fitted
    check_memory_plan(None, config, ("factors",))
    config.scoring.estimator = "probe_projection"  # the fast path's scoring is not EK-FAC's: the load only
    check_memory_plan(None, config, ("scores",))
    config.model.device_memory = "1kB"
    with pytest.raises(RunError, match="load needs"):
        check_memory_plan(None, config, ("scores",))
