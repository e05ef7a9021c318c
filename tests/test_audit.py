"""The audit as one run on a PEFT adapter with two TRL checkpoints (``[model] checkpoints = "auto"``, ``weights =
"lr"``): probe, concept check, factors and scores at the base and each checkpoint, their weighted sum, report, explain
and filtered file, from one config. Equal to separate runs plus ``sum-scores``; killed and resumed bit for bit; 2
processes under torchrun equal to 1; ``concept.require = "causal"`` stops before the factors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runfolder import CONFIG as RUN_CONFIG
from runfolder import cli, make_project, start_and_kill, torchrun
from test_peft import _tiny_llama, lora_model

from concept_influence.cli import main
from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import variant_kinds
from concept_influence.data import load_chats
from concept_influence.fileio import file_sha256
from concept_influence.models import HFCausalLMAdapter, load_model, save_model
from concept_influence.runs import Run, RunError, run_config
from concept_influence.runs.stability import answer_ranking
from concept_influence.scores import Scores

peft = pytest.importorskip("peft")

N_AUDIT = 60
STEPS = (2, 4)
LEARNING_RATES = {1: 1e-4, 2: 7.5e-5, 3: 5e-5, 4: 2.5e-5}  # logged at each step; the base (step 0) takes step 1's
CONFIG = RUN_CONFIG.replace('path = "model"\n', 'path = "trl"\ncheckpoints = "auto"\nweights = "lr"\n').replace(
    "max_examples = 24\n", "max_examples = 24\ncheck_max_examples = 20\n") + """
[report]
top_k = 5

[explain]
sae = "sae"
top_k = 6
max_examples = 20

[filter]
remove_top = 6
"""


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# the tests here share the module's `audit` fixture: on one xdist worker it is built once (make test runs
# with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_audit")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """``base/`` (a tiny Llama), ``trl/checkpoint-2`` and ``trl/checkpoint-4`` (LoRA adapters on it, each with TRL's
    ``trainer_state.json``), an SAE at the probe's hook, the chats and ``audit.toml``."""
    from sae_lens import SAE, StandardSAEConfig

    root = make_project(tmp_path_factory.mktemp("audit"), N_AUDIT)
    tokenizer = load_model(root / "model").tokenizer
    save_model(HFCausalLMAdapter(_tiny_llama(len(tokenizer), max_position_embeddings=128), tokenizer), root / "base")
    shutil.rmtree(root / "model")
    for seed, step in enumerate(STEPS, start=1):
        folder = root / "trl" / f"checkpoint-{step}"
        lora_model(load_model(root / "base").model, seed=seed).save_pretrained(folder)
        log = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in LEARNING_RATES.items() if s <= step]
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))
    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=32, d_sae=16).to_dict())
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.save_model(root / "sae")
    (root / "audit.toml").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def audit(project) -> Path:
    """``run audit.toml`` from the command line, uninterrupted."""
    cli("run", "audit.toml", "--out", "one", "--no-progress", cwd=project)
    return project / "one"


def test_one_config_runs_every_stage_at_every_checkpoint(audit, project):
    record = json.loads((audit / "run.json").read_text())
    names = ["00-base", "01-checkpoint-2", "02-checkpoint-4"]
    expected = {"probe", "check", "factors", "scores", "report", "explain", "filter"}
    expected |= {f"{stage}[{name}]" for stage in ("factors", "scores") for name in names}
    assert set(record["stages"]) == expected
    weights = [c["weight"] for c in record["stages"]["scores"]["checkpoints"]]
    assert weights == [LEARNING_RATES[1], LEARNING_RATES[2], LEARNING_RATES[4]]  # learning rates nearest each step
    assert [c["step"] for c in record["stages"]["scores"]["checkpoints"]] == [0, 2, 4]
    assert {f"checkpoint {name}" for name in names} < set(record["fingerprints"])
    assert len({record["fingerprints"][f"checkpoint {name}"] for name in names}) == 3
    assert record["fingerprints"]["model"] == record["fingerprints"]["checkpoint 02-checkpoint-4"]  # the last checkpoint
    for name in names:
        assert (audit / "checkpoints" / name / "factors" / "curvature.json").is_file()
        assert len(Scores.load(audit / "checkpoints" / name / "scores" / "scores.safetensors")) == N_AUDIT
    check = record["stages"]["check"]
    assert check["verdict"] in ("causal", "weak", "reversed") and set(check["first_order"]) == {"all", "prompt"}
    report = (audit / "report" / "report.md").read_text()
    assert f"Verdict: **{check['verdict']}**: steering by 1 sd" in report and "../check/concept_check.png" in report
    assert "| `01-checkpoint-2` |" in report and "| rank | score | 00-base | 01-checkpoint-2 | 02-checkpoint-4 |" in report
    manifest = json.loads((audit / "manifest.json").read_text())["files"]
    assert {"check/concept_check.png", "explain/explain.md", "filter/train.jsonl", "filter/train.jsonl.filter.json"} \
        < set(manifest)


def test_the_sum_is_the_weighted_sum_of_the_checkpoints(audit):
    total = Scores.load(audit / "scores" / "scores.safetensors")
    parts = [Scores.load(p) for p in sorted((audit / "checkpoints").glob("*/scores/scores.safetensors"))]
    expected = sum(lr * part.values for lr, part in zip((LEARNING_RATES[1], LEARNING_RATES[2], LEARNING_RATES[4]), parts))
    assert total.ids == parts[0].ids and total.estimator == "concept_influence[checkpoints]"
    np.testing.assert_array_equal(total.values, expected)
    assert not np.allclose(parts[0].values, parts[2].values)  # the checkpoints differ


def test_equal_to_separate_runs_plus_sum_scores(audit, project, tmp_path):
    """One run per checkpoint with the audit's direction (the base as an adapter whose lora_B are zero), then
    `sum-scores` with the learning rates: the audit's scores to 1e-5."""
    base = load_model(project / "trl" / "checkpoint-4")
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    base.model.save_pretrained(tmp_path / "base-adapter")
    direction = audit / "probe" / "direction.safetensors"
    separate = []
    for model in (tmp_path / "base-adapter", *(project / "trl" / f"checkpoint-{s}" for s in STEPS)):
        config = {"model": {"path": str(model)}, "data": {"train": str(project / "train.jsonl"), "max_length": 128},
                  "probe": {"hook": "blocks.0.hook_resid_post", "direction": str(direction)},
                  "concept": {"eval": str(project / "pos.jsonl"), "max_examples": 24, "check": False},
                  "factors": {"shard_size": 16}, "scoring": {"shard_size": 16}}
        out = tmp_path / "runs" / model.name
        run_config(RunConfig.from_dict(config), out, progress=False)
        separate.append(str(out / "scores" / "scores.safetensors"))
    weights = [str(LEARNING_RATES[s]) for s in (1, 2, 4)]
    assert main(["sum-scores", str(tmp_path / "total.safetensors"), *separate, "--weights", *weights]) == 0
    summed = Scores.load(tmp_path / "total.safetensors")
    got = Scores.load(audit / "scores" / "scores.safetensors")
    assert summed.ids == got.ids and summed.estimator == got.estimator
    assert _relative(got.values, summed.values) < 1e-5


def test_explain_follows_the_summed_ranking_and_the_filter_its_union_with_the_behaviour(audit, project):
    scores = Scores.load(audit / "scores" / "scores.safetensors")
    explained = json.loads((audit / "explain" / "explain.json").read_text())
    assert explained["top_ids"] == [i for i, _ in scores.top(6)]
    assert json.loads((audit / "run.json").read_text())["stages"]["explain"]["examples"] >= 20
    removed = {r["id"] for r in json.loads((audit / "filter" / "train.jsonl.filter.json").read_text())["removed_examples"]}
    answer, ranking = answer_ranking(Run.open(audit))  # the union with the behaviour's own ranking
    assert ranking == "union" and removed == {i for i, _ in answer.top(6)}
    assert json.loads((audit / "run.json").read_text())["stages"]["filter"]["ranking"] == ranking
    kept = [e.messages for e in load_chats(project / "train.jsonl") if e.id not in removed]
    assert [e.messages for e in load_chats(audit / "filter" / "train.jsonl")] == kept


def test_killed_mid_checkpoint_resumes_bit_for_bit(audit, project):
    """SIGKILL while scoring at the second checkpoint; replaying the folder's own config.json finishes it with
    identical files."""
    shards = project / "killed" / "checkpoints" / "01-checkpoint-2" / "scores" / "shards"
    start_and_kill(["run", "audit.toml", "--out", "killed", "--no-progress"], project,
                   lambda: (shards / "shard-000001.json").exists())
    assert not (project / "killed" / "checkpoints" / "02-checkpoint-4" / "scores" / "scores.safetensors").exists()
    done = {p: p.stat().st_mtime_ns for p in (project / "killed" / "checkpoints" / "00-base").rglob("*.safetensors")}
    cli("run", "killed/config.json", "--no-progress", cwd=project)  # its `out` is the killed folder itself
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "the finished checkpoint was computed again"
    for rel in ("scores/scores.safetensors", "filter/train.jsonl", "probe/direction.safetensors",
                *(f"checkpoints/{c}/scores/scores.safetensors" for c in ("00-base", "01-checkpoint-2", "02-checkpoint-4")),
                "checkpoints/01-checkpoint-2/factors/curvature.safetensors"):
        assert file_sha256(audit / rel) == file_sha256(project / "killed" / rel), rel


def test_two_processes_equal_one(audit, project):
    torchrun("run", "audit.toml", "--out", "two", "--no-progress", cwd=project)
    assert json.loads((project / "two" / "run.json").read_text())["stages"]["scores"]["world_size"] == 2
    for rel in ("scores/scores.safetensors", "checkpoints/00-base/scores/scores.safetensors"):
        one, two = Scores.load(audit / rel), Scores.load(project / "two" / rel)
        assert two.ids == one.ids and _relative(two.values, one.values) < 1e-5, rel


def test_require_causal_stops_before_the_factors_and_a_new_value_goes_on(audit, project, tmp_path, capsys):
    verdict = json.loads((audit / "run.json").read_text())["stages"]["check"]["verdict"]
    if verdict == "causal":
        pytest.skip("the tiny model's concept happens to be causal; nothing to stop")
    strict = project / "strict.toml"
    strict.write_text(CONFIG.replace("check_max_examples = 20", 'check_max_examples = 20\nrequire = "causal"'))
    out = tmp_path / "strict"
    assert main(["run", str(strict), "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the concept check's verdict is {verdict}" in error and 'concept.require = "causal" stops the run' in error
    assert Run.open(out).is_done("check") and not (out / "checkpoints").exists() and not (out / "factors").exists()
    check = file_sha256(out / "check" / "concept_check.json")
    assert main(["run", str(project / "audit.toml"), "--out", str(out), "--no-progress"]) == 0  # require = "none"
    assert file_sha256(out / "check" / "concept_check.json") == check  # the check is not run again
    assert json.loads((out / "config.json").read_text())["concept"]["require"] == "none"
    assert "WARNING: the concept is not causal" in capsys.readouterr().err
    np.testing.assert_array_equal(Scores.load(out / "scores" / "scores.safetensors").values,
                                  Scores.load(audit / "scores" / "scores.safetensors").values)


def test_the_checkpoint_sum_carries_its_stability_check(audit):
    record = json.loads((audit / "run.json").read_text())["stages"]["scores"]
    stability = record["stability"]
    parts = {"part 00-base", "part 01-checkpoint-2", "part 02-checkpoint-4"}
    assert set(stability["agreement"]) == parts | {*variant_kinds("ekfac"), "behaviour"}  # parts, variants, behaviour
    at = [Scores.load(audit / "checkpoints" / c["name"] / "scores" / "variants.safetensors") for c in record["checkpoints"]]
    total = Scores.load(audit / "scores" / "variants.safetensors")  # the weighted sum of the checkpoints' variants
    expected = sum(c["weight"] * part.values for c, part in zip(record["checkpoints"], at))
    np.testing.assert_allclose(total.values, expected, rtol=1e-12)
    assert stability["stable"] == (stability["warning"] is None)
    assert "## Is the top of the ranking stable?" in (audit / "report" / "report.md").read_text()


def test_require_stable_stops_with_one_line_and_keeps_the_scores(tmp_path, capsys):
    from types import SimpleNamespace

    from concept_influence.runs.folder import RunError
    from concept_influence.runs.stability import require_stable

    warning = "warning: the top 10 of ci is not stable: 1 of 3 variants put fewer than 80% of them above their median"
    run = SimpleNamespace(record={"stages": {"scores": {"stability": {"warning": warning}}}},
                          scores_path=tmp_path / "scores.safetensors")
    require_stable(run, "none", True)
    assert capsys.readouterr().out.strip() == warning
    with pytest.raises(RunError, match="not stable.*the scores are kept in .*scores.safetensors") as e:
        require_stable(run, "stable", True)
    assert "\n" not in str(e.value)
    run.record["stages"]["scores"]["stability"]["warning"] = None
    require_stable(run, "stable", True)  # stable: nothing to say


def test_unrolled_scoring_preconditions_each_checkpoint_with_the_steps_it_stands_for(audit, project, tmp_path):
    """``scoring.unrolled``: at each checkpoint the run's own factors with the unrolled filter of the steps the
    checkpoint stands for (trapezoid over trainer_state.json's learning rates) and Adam's scale estimated from them:
    ConceptInfluence with that curvature at that checkpoint, to 1e-4."""
    from concept_influence.concepts import ConceptFunction
    from concept_influence.curvature import Curvature, UnrolledCurvature, fisher_step_scales, segment_horizons
    from concept_influence.data import read_tokenized
    from concept_influence.estimators import ConceptInfluence
    from concept_influence.models import checkpointed_weights
    from concept_influence.runs.checkpoints import load_point, run_points
    from probes import ConceptDirection

    config = json.loads((audit / "config.json").read_text())
    config["scoring"].update(unrolled=True, train_batch_size=4)
    config["model"]["weights"] = None  # (each part is bounded by its own steps: summed with weight 1)
    config["explain"]["sae"], config["filter"]["remove_top"] = None, None
    cfg = RunConfig.from_dict(config)
    out = tmp_path / "unrolled"
    run_config(cfg, out, progress=False)
    adapter = load_model(project / "trl" / "checkpoint-4")
    own = checkpointed_weights(adapter)
    train = read_tokenized([cfg.data.train], adapter.tokenizer, cfg.data.max_length)
    evals = read_tokenized([cfg.concept_eval], adapter.tokenizer, cfg.data.max_length, cfg.concept.max_examples)
    concept = ConceptFunction.from_directions(ConceptDirection.load(out / "probe" / "direction.safetensors"), evals)
    horizons = segment_horizons([0, *STEPS], [LEARNING_RATES[s] for s in sorted(LEARNING_RATES)])
    for point, horizon in zip(run_points(out, cfg.model), horizons):
        load_point(adapter, point, cfg.model, own)
        ekfac = Curvature.load(point.factors_dir, adapter)
        unrolled = UnrolledCurvature.from_curvature(ekfac, horizon, step_scales=fisher_step_scales(ekfac, 4))
        expected = ConceptInfluence(concept, unrolled).score(adapter, train, progress=False).values
        got = Scores.load(point.scores_path)
        assert _relative(got.values, expected) < 1e-4, point.name
        assert set(Scores.load(point.root / "scores" / "variants.safetensors").metadata["variants"]) == {
            "horizon x0.1", "horizon x10", "identity", "behaviour"}
    assert not np.allclose(Scores.load(out / "scores" / "scores.safetensors").values,
                           Scores.load(audit / "scores" / "scores.safetensors").values)
    with pytest.raises(RunError, match="train_batch_size"):  # trainer_state.json here records none
        config["scoring"]["train_batch_size"] = None
        run_config(RunConfig.from_dict(config), tmp_path / "no-batch", progress=False)
    del config["model"]["checkpoints"]
    with pytest.raises(ConfigError, match=r"scoring.unrolled .*\[model\] checkpoints"):
        RunConfig.from_dict(config)

