"""TrackStar's optimizer-state correction in a run folder (issue 28 item 3): ``[factors] strategy = "adam_state"``
reads the fine-tune's ``optimizer.pt`` in the factors stage (no pass over the data) and records what it read; the
run's scores equal ``AdamStateCurvature.from_checkpoint`` with the same estimator; the identity index built on the run
is exact and the projected ones are refused before any work; bad input is one error naming the file or the key,
before any work, and nothing already computed is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runfolder import N_TRAIN, in_memory_inputs, make_project
from test_optimizer_state import _checkpoint, _train

from concept_influence.cli import main
from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import AdamStateCurvature, Curvature
from concept_influence.data import load_chat_jsonl, tokenize_examples
from concept_influence.estimators import ConceptInfluence
from concept_influence.fileio import file_sha256
from concept_influence.models import load_model
from concept_influence.runs import run_config, run_stages
from concept_influence.scores import Scores

# the tests share the module's fixtures: on one xdist worker they are built once (make test runs --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_run_optimizer_state")

FACTORS = "[factors]\nshard_size = 16\n"


def config(project: Path, name: str, factors: str, *changes: str) -> Path:
    """The project's config with ``factors`` as its ``[factors]`` section (and each ``old, new`` pair of ``changes``
    replaced), written as ``name``."""
    text = (project / "run.toml").read_text().replace(FACTORS, f"[factors]\n{factors}\n")
    for old, new in zip(changes[::2], changes[1::2]):
        assert old in text, old
        text = text.replace(old, new)
    (project / name).write_text(text)
    return project / name


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The run-folder project with ``checkpoint-3/optimizer.pt``: three AdamW steps on its saved model in one
    parameter group (``AdamW(model.parameters())``), as the fine-tune's optimizer leaves them."""
    torch.set_num_threads(1)
    root = make_project(tmp_path_factory.mktemp("adam"))
    adapter = load_model(root / "model")
    examples = tokenize_examples(load_chat_jsonl(root / "train.jsonl", 12), adapter.tokenizer, 128, True)
    optimizer = torch.optim.AdamW(adapter.model.parameters(), lr=1e-2)
    _train(adapter, examples, optimizer)
    _checkpoint(root, optimizer)
    config(root, "adam.toml", 'strategy = "adam_state"\noptimizer_state = "checkpoint-3"')
    return root


@pytest.fixture(scope="module")
def adam_run(project) -> Path:
    run_config(RunConfig.read(project / "adam.toml"), project / "runs" / "adam", progress=False)
    return project / "runs" / "adam"


def test_the_run_reads_the_optimizer_state_and_scores_as_the_python_api(project, adam_run):
    stage = json.loads((adam_run / "run.json").read_text())["stages"]["factors"]
    optimizer = project / "checkpoint-3" / "optimizer.pt"
    assert stage["strategy"] == "adam_state" and stage["n_examples"] == 0
    assert stage["optimizer_state"] == {"path": str(optimizer), "sha256": file_sha256(optimizer), "power": 2,
                                        "key": "factors.optimizer_state"}
    assert not (adam_run / "factors" / "statistics").exists()  # nothing fitted
    adapter, train, concept = in_memory_inputs(project, adam_run)
    curvature = AdamStateCurvature.from_checkpoint(adapter, project / "checkpoint-3", adapter.linear_maps(max_block=0))
    assert stage["maps"] == curvature.map_names
    expected = ConceptInfluence(concept, curvature).score(adapter, train, progress=False)
    got = Scores.load(adam_run / "scores" / "scores.safetensors")
    assert got.ids == expected.ids and len(got) == N_TRAIN
    err = np.linalg.norm(got.values - expected.values) / np.linalg.norm(expected.values)
    assert err < 1e-6, err
    variants = Scores.load(adam_run / "scores" / "variants.safetensors")
    assert any(c.startswith("identity:") for c in variants.columns)  # its stability variant: no correction


def test_power_one_needs_no_probe(project, tmp_path):
    """``power = 1`` (the training side only) is the API's ``power=1``; the factors stage runs without the probe."""
    path = config(project, "power1.toml", 'strategy = "adam_state"\noptimizer_state = "checkpoint-3"\npower = 1')
    run_stages(("factors",), tmp_path / "run", RunConfig.read(path), progress=False)
    adapter = load_model(project / "model")
    saved = Curvature.load(tmp_path / "run" / "factors", adapter)
    api = AdamStateCurvature.from_checkpoint(adapter, project / "checkpoint-3", adapter.linear_maps(max_block=0), power=1)
    assert isinstance(saved, AdamStateCurvature) and saved.power == 1 and not (tmp_path / "run" / "probe").exists()
    assert all(torch.equal(saved.scales[n], api.scales[n]) for n in api.map_names)


def test_the_identity_index_of_the_run_is_exact_and_the_projections_refuse_it(project, adam_run, tmp_path, capsys):
    assert main(["index", "build", str(adam_run), "--out", str(tmp_path / "i"), "--projection", "identity",
                 "--dtype", "float32", "--no-progress"]) == 0
    out = tmp_path / "q.safetensors"
    assert main(["index", "query", str(tmp_path / "i"), "--out", str(out), "--no-progress"]) == 0
    ref, got = Scores.load(adam_run / "scores" / "scores.safetensors"), Scores.load(out)
    assert got.ids == ref.ids and np.abs(got.values - ref.values).max() < 1e-5 * np.abs(ref.values).max()
    for projection in ("eigen", "random"):
        error = _cli_error(capsys, "index", "build", str(adam_run), "--out", str(tmp_path / projection),
                           "--projection", projection)
        assert f"the {projection} projection needs" in error and "adam_state does not" in error
        assert "identity projection takes any" in error and not (tmp_path / projection).exists()


def _cli_error(capsys, *args: str) -> str:
    """Run the CLI in-process: exit status 2 and one error line."""
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("concept-influence: error: "), err
    return err


@pytest.mark.parametrize("factors, changes, message", [
    ('strategy = "adam_stat"', (), "'factors.strategy' must be one of ekfac, kfac"),
    ('strategy = "adam_state"\nshard_size = 16', (), "factors.shard_size: adam_state reads the optimizer state, it "
                                                     "fits nothing; remove shard_size"),
    ('optimizer_state = "checkpoint-3"', (), 'optimizer_state and power are read with strategy = "adam_state"'),
    ('strategy = "adam_state"\npower = 3', (), "'factors.power' must be one of 1, 2; got 3"),
    ('strategy = "adam_state"', ("[scoring]\n", "[scoring]\nunrolled = true\n", "[model]\n",
                                 '[model]\ncheckpoints = ["checkpoint-3"]\n'), "scoring.unrolled unrolls a fitted EK-FAC"),
])
def test_a_bad_config_is_one_error_naming_the_key(project, tmp_path, capsys, factors, changes, message):
    path = config(project, "bad.toml", factors, *changes)
    with pytest.raises(ConfigError, match="bad.toml"):
        RunConfig.read(path)
    error = _cli_error(capsys, "run", str(path), "--out", str(tmp_path / "run"))
    assert message in error and not (tmp_path / "run").exists()


@pytest.mark.parametrize("factors, changes, message", [
    ('strategy = "adam_state"\noptimizer_state = "nowhere"', (),
     "/nowhere: no such file (a Trainer checkpoint folder holds optimizer.pt) (factors.optimizer_state)"),
    ('strategy = "adam_state"', (), "model/optimizer.pt: no such file (a Trainer checkpoint folder holds optimizer.pt) "
                                    "(model.path)"),  # (default: the [model] folder's)
    ('strategy = "adam_state"', ("[model]\n", '[model]\ncheckpoints = ["base", "checkpoint-3"]\n'),
     "the base model of model.checkpoints has no optimizer state; give factors.optimizer_state"),
])
def test_a_missing_optimizer_state_is_named_before_any_work(project, tmp_path, capsys, factors, changes, message):
    path = config(project, "missing.toml", factors, *changes)
    error = _cli_error(capsys, "run", str(path), "--out", str(tmp_path / "run"))
    assert message in error
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"] == {}  # nothing computed


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_optimizer_state_of_other_parameters_is_refused_and_the_probe_is_kept(project, adam_run, tmp_path, capsys):
    """An optimizer.pt whose parameters do not match the model's (one fewer; the first one's moments in another shape)
    stops the run before the factors, naming the file and the key; the finished probe stage is kept and used once the
    file is fixed, and the scores are then those of the run with the good file."""
    folder = Path(shutil.copytree(project / "checkpoint-3", tmp_path / "checkpoint-3"))
    path = config(project, "other.toml", f'strategy = "adam_state"\noptimizer_state = "{folder}"')
    run_stages(("probe",), tmp_path / "run", RunConfig.read(path), progress=False)
    before = _snapshot(tmp_path / "run")
    good = torch.load(folder / "optimizer.pt", weights_only=True)
    group, first = good["param_groups"][0], good["state"][0]
    fewer = {**good, "param_groups": [{**group, "params": group["params"][:-1]}]}
    reshaped = {**good, "state": {**good["state"], 0: {**first, "exp_avg_sq": first["exp_avg_sq"][:1]}}}
    n = len(group["params"]) - 1
    for bad, fragment in ((fewer, f"the optimizer has {n} in groups of [{n}]"),
                          (reshaped, "optimizer parameter 0 has shape (1, ")):
        torch.save(bad, folder / "optimizer.pt")
        error = _cli_error(capsys, "run", str(path), "--out", str(tmp_path / "run"))
        assert f"{folder / 'optimizer.pt'}: the optimizer's parameters do not match the model's" in error, error
        assert fragment in error and error.endswith("(factors.optimizer_state)")
        assert _snapshot(tmp_path / "run") == before
    torch.save(good, folder / "optimizer.pt")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert all(_snapshot(tmp_path / "run")[k] == v for k, v in before.items() if k.startswith("probe/"))
    ref, got = (Scores.load(run / "scores" / "scores.safetensors") for run in (adam_run, tmp_path / "run"))
    assert got.ids == ref.ids and np.array_equal(got.values, ref.values)


def test_the_memory_plan_counts_no_factor_pass(project, capsys):
    """``run`` and ``plan`` plan adam_state's scoring as EK-FAC's (an upper bound: its scales are the size of EK-FAC's
    eigenvalues), every map at once; its factors stage, which fits nothing, is not checked."""
    from concept_influence.runs import check_memory_plan
    from concept_influence.runs.plans import planned_strategy, run_plan

    cfg = RunConfig.read(project / "adam.toml")
    assert planned_strategy(cfg) == "ekfac" and run_plan(cfg, 10**12).engine == "current"
    check_memory_plan(None, cfg, ("factors",))
    assert main(["plan", str(project / "adam.toml"), "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "current engine" in out and "'adam_state' is read from a file, not fitted" in out
