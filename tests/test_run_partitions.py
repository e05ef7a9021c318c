"""``[factors] partitions`` in run folders (issue 27, item 3): a run fitted in partitions of maps scores as the
unpartitioned run; its factors are on disk per map and scoring streams them; a run stopped between partitions, or
killed inside one, resumes without redoing the finished partitions and ends with the same factors; the plan counts the
passes the run makes; bad partition input is an error naming the file or the key."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from norms import assert_close_in_norm
from runfolder import make_project, run_reference, start_and_kill
from test_run_errors import fails

from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import Curvature
from concept_influence.fileio import file_sha256
from concept_influence.models import load_model
from concept_influence.runs import partitioned, run_stages
from concept_influence.runs.plans import factor_partitions, run_plan
from concept_influence.scores import Scores


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("partitions"))
    text = (root / "run.toml").read_text()
    (root / "parts.toml").write_text(text.replace("[factors]\n", "[factors]\npartitions = 3\n"))
    return root


@pytest.fixture(scope="module")
def reference(project) -> Path:
    return run_reference(project)


@pytest.fixture(scope="module")
def parts(project) -> Path:
    """The project's run fitted in 3 partitions, scored."""
    torch.set_num_threads(1)
    run_stages(("probe", "factors", "scores"), project / "runs" / "parts", RunConfig.read(project / "parts.toml"),
               progress=False)
    return project / "runs" / "parts"


def _maps(project: Path) -> list:
    return load_model(project / "model").linear_maps(max_block=0)


def test_partitioned_run_scores_equal_the_unpartitioned_run(reference, parts, project):
    a = Scores.load(reference / "scores" / "scores.safetensors")
    b = Scores.load(parts / "scores" / "scores.safetensors")
    assert a.ids == b.ids
    assert np.abs(b.values - a.values).max() / np.abs(a.values).max() < 1e-5
    factors, names = parts / "factors", [m.name for m in _maps(project)]
    recorded = json.loads((factors / "partitions.json").read_text())["partitions"]
    assert len(recorded) == 3 and [n for g in recorded for n in g] == names
    assert json.loads((reference / "factors" / "partitions.json").read_text())["partitions"] is None  # auto on the CPU
    assert json.loads((factors / "settings.json").read_text())["partitions"] == 3
    assert "partitions" not in json.loads((reference / "factors" / "settings.json").read_text())  # (a default added later)
    saved = json.loads((factors / "curvature.json").read_text())
    assert saved["storage"] == "maps" and [m["name"] for m in saved["maps"]] == names
    assert len(list((factors / "maps").glob("*.safetensors"))) == len(names)
    assert not (factors / "curvature.safetensors").exists() and not list((factors / "partial").glob("*"))
    stats = sorted(p.name for p in (factors / "statistics").iterdir())
    assert stats == [f"{p}-p{i:02d}.safetensors" for p in ("covariance", "eigenvalues") for i in range(3)]
    manifest = json.loads((parts / "manifest.json").read_text())["files"]
    assert f"factors/{saved['maps'][0]['file']}" in manifest


def test_the_plan_counts_the_passes_the_run_makes(parts, project, capsys):
    from concept_influence.cli import main

    config = RunConfig.read(project / "parts.toml")
    plan = run_plan(config, None)
    assert plan.n_partitions == 3 and plan.factor_passes == 6 == len(list((parts / "factors" / "statistics").iterdir()))
    assert [[m.name for m in g] for g in factor_partitions(config, _maps(project))] == plan.partitions[0]
    assert main(["plan", str(project / "parts.toml")]) == 0
    assert "3 partition(s) per rank, 6 passes over the data" in capsys.readouterr().out
    assert main(["plan", str(project / "run.toml")]) == 0
    assert "1 partition(s) per rank, 2 passes over the data" in capsys.readouterr().out


def test_auto_partitions_are_the_plans_when_every_factor_at_once_does_not_fit(project):
    text = (project / "run.toml").read_text().replace("max_length = 128", "max_length = 8")
    (project / "auto.toml").write_text(text.replace("[factors]\n", "[factors]\nbatch_size = 1\n"))
    config, maps = RunConfig.read(project / "auto.toml"), _maps(project)
    sizes = range(10**5, 10**7, 10**4)
    smallest = next(m for m in sizes if run_plan(config, m).fits)  # the smallest device the run fits
    plan = run_plan(config, smallest)
    assert plan.engine == "partitioned" and plan.n_partitions > 1
    config.model.device_memory = str(smallest)
    assert [[m.name for m in g] for g in factor_partitions(config, maps)] == plan.partitions[0]
    config.model.device_memory = "1GB"  # every factor at once fits: no partitions, one file
    assert run_plan(config, 10**9).engine == "current" and factor_partitions(config, maps) is None


def test_streamed_preconditioning_equals_in_memory(reference, parts):
    streamed, whole = Curvature.load(parts / "factors"), Curvature.load(reference / "factors")
    assert streamed.streams and not whole.streams and streamed.shapes == whole.shapes
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(2, *s, generator=g) for n, s in whole.shapes.items()}
    got, want = streamed.precondition(grads), whole.precondition(grads)
    for name in grads:
        assert_close_in_norm(got[name], want[name], 1e-5)
    in_memory = Curvature.load(streamed.save(parts.parent / "parts-single", per_map=False))
    for name, v in in_memory.precondition(grads).items():
        torch.testing.assert_close(v, got[name], rtol=0, atol=0)


def _started(project: Path, out: Path, train_copies: int = 1) -> Path:
    """A copy of the project (training data ``train_copies`` times over) with the probe of a partitioned run done."""
    shutil.copytree(project, out, ignore=shutil.ignore_patterns("runs"))
    (out / "train.jsonl").write_text((project / "train.jsonl").read_text() * train_copies)
    run_stages(("probe",), out / "run", RunConfig.read(out / "parts.toml"), progress=False)
    return out


def _factor_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))
            if "partial" not in p.parts}


def test_a_run_stopped_between_partitions_resumes_to_the_same_factors(parts, project, tmp_path, monkeypatch):
    root = _started(project, tmp_path / "p")
    real, calls = partitioned.fit_curvature, []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped between partitions")
        return real(*args, **kwargs)

    monkeypatch.setattr(partitioned, "fit_curvature", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_stages(("factors",), root / "run", progress=False)
    factors = root / "run" / "factors"
    first = json.loads((factors / "partitions.json").read_text())["partitions"][0]
    written = {p: p.stat().st_mtime_ns for p in (factors / "maps").iterdir()}
    assert len(written) == len(first) and not (factors / "curvature.json").exists()
    monkeypatch.setattr(partitioned, "fit_curvature", real)
    run_stages(("factors",), root / "run", progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in written.items()), "the finished partition was fitted again"
    assert _factor_files(factors) == _factor_files(parts / "factors")
    assert (factors / "curvature.json").read_text() == (parts / "factors" / "curvature.json").read_text()


def test_a_run_killed_inside_a_partition_does_not_redo_the_finished_ones(project, tmp_path):
    root = _started(project, tmp_path / "k", train_copies=2)
    shutil.copytree(root / "run", root / "uninterrupted")
    run_stages(("factors",), root / "uninterrupted", progress=False)
    factors = root / "run" / "factors"

    def inside_the_second_partition() -> bool:  # its covariance pass has checkpointed a shard
        return (factors / "partial" / "covariance-p01-rank0of1.safetensors").exists()

    start_and_kill(["fit-factors", "run", "--no-progress"], root, inside_the_second_partition)
    finished = [p for p in (factors / "statistics").iterdir() if "-p00" in p.name] + list((factors / "maps").iterdir())
    assert len(finished) > 2 and not (factors / "statistics" / "covariance-p01.safetensors").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    run_stages(("factors",), root / "run", progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "a finished partition was fitted again"
    assert _factor_files(factors) == _factor_files(root / "uninterrupted" / "factors")


def test_bad_partition_input_names_the_file_or_the_key(parts, project, tmp_path, capsys):
    for value, message in (("0", "factors.partitions must be"), ('"some"', "factors.partitions must be"),
                           ("true", "'factors.partitions' must be")):
        path = tmp_path / "bad.toml"
        path.write_text((project / "parts.toml").read_text().replace("partitions = 3", f"partitions = {value}"))
        with pytest.raises(ConfigError, match="bad.toml") as e:
            RunConfig.read(path)
        assert message in str(e.value)
    run = Path(shutil.copytree(parts, tmp_path / "run"))
    (run / "scores" / "scores.safetensors").unlink()  # (scored again below)
    shutil.rmtree(run / "scores" / "shards")
    first = run / "factors" / json.loads((run / "factors" / "curvature.json").read_text())["maps"][0]["file"]
    first.write_bytes(pickle.dumps({"not": "tensors"}))
    line = fails(capsys, "score", str(run), "--no-progress")
    assert str(first) in line and "pickles are refused" in line
    (run / "factors" / "curvature.json").unlink()  # a fit that had not finished, with a broken record of partitions
    (run / "factors" / "partitions.json").write_text('{"partitions": [["blocks.0.nothing"]]}')
    line = fails(capsys, "fit-factors", str(run), "--no-progress")
    assert str(run / "factors" / "partitions.json") in line and "blocks.0.nothing" in line
