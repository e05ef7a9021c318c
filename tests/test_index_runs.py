"""The gradient index over run folders: `index query` reproduces `score`, a build killed with SIGKILL resumes to the
same files bit for bit, two torchrun processes build what one builds, and bad input is one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from runfolder import N_TRAIN, cli_env, make_project, start_and_kill

from concept_influence.cli import main
from concept_influence.config import RunConfig
from concept_influence.fileio import file_sha256
from concept_influence.index import GradientIndex, GradientIndexError, IndexSettings
from concept_influence.index.from_runs import build_from_runs
from concept_influence.models import load_model, save_model
from concept_influence.runs import run_config, run_stages
from concept_influence.scores import Scores
from probes import ConceptDirection

SETTINGS = IndexSettings(projection="random", rank=4, shard_size=16)


# the tests here share the module's `project` fixture: on one xdist worker it is built once (make test runs
# with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_index_runs")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The run-folder project with the training data four times over (25 shards of 16), its run scored, and an index
    of it built in this process (the reference for the files of every other build)."""
    torch.set_num_threads(1)
    root = make_project(tmp_path_factory.mktemp("index"))
    (root / "train.jsonl").write_text((root / "train.jsonl").read_text() * 4)
    run_config(RunConfig.read(root / "run.toml"), root / "run", progress=False)
    build_from_runs([root / "run"], root / "reference", SETTINGS, progress=False)
    return root


def _shard_hashes(index: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted((index / "checkpoints" / "00" / "shards").glob("*.safetensors"))}


def _cli_error(capsys, *args: str) -> str:
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("concept-influence: error: ")
    return err


def test_uncompressed_index_query_equals_score(project, tmp_path, capsys):
    """`index build --projection identity` then `index query` (the run's own concept by default) gives the run's
    `score` output; the report and `filter` read the query's scores file."""
    assert main(["index", "build", str(project / "run"), "--out", str(tmp_path / "i"), "--projection", "identity",
                 "--dtype", "float32", "--shard-size", "64", "--no-progress"]) == 0
    out = tmp_path / "q.safetensors"
    assert main(["index", "query", str(tmp_path / "i"), "--out", str(out), "--report", str(tmp_path / "report"),
                 "--no-progress"]) == 0
    ref, got = Scores.load(project / "run" / "scores" / "scores.safetensors"), Scores.load(out)
    assert got.ids == ref.ids and len(got) == 4 * N_TRAIN and got.estimator == ref.estimator
    assert np.abs(got.values - ref.values).max() < 1e-4 * np.abs(ref.values).max()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Which concepts each top example moves" in report and (tmp_path / "report" / "concept_map.png").is_file()
    assert main(["filter", str(out), str(project / "train.jsonl"), str(tmp_path / "kept.jsonl"), "--remove-top", "10"]) == 0
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 4 * N_TRAIN - 10


def test_build_killed_with_sigkill_resumes_to_identical_files(project, tmp_path):
    shards = tmp_path / "killed" / "checkpoints" / "00" / "shards"
    args = ["index", "build", str(project / "run"), "--out", str(tmp_path / "killed"), "--projection", "random",
            "--rank", "4", "--shard-size", "16", "--no-progress"]
    start_and_kill(args, project, lambda: (shards / "shard-000002.safetensors").exists())
    done = len(list(shards.glob("*.safetensors")))
    assert 3 <= done < 25, "killed after the third shard and before the last"
    done = subprocess.run([sys.executable, "-m", "concept_influence", *args], cwd=project, env=cli_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _shard_hashes(tmp_path / "killed") == _shard_hashes(project / "reference")
    killed, reference = GradientIndex(tmp_path / "killed"), GradientIndex(project / "reference")
    assert killed.checkpoints[0]["n_examples"] == reference.checkpoints[0]["n_examples"] == 4 * N_TRAIN


def test_two_torchrun_processes_build_what_one_builds(project, tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "concept_influence", "index", "build", "run", "--out", str(tmp_path / "two"),
                           "--projection", "random", "--rank", "4", "--shard-size", "16", "--no-progress"],
                          cwd=project, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert _shard_hashes(tmp_path / "two") == _shard_hashes(project / "reference")
    entry = GradientIndex(tmp_path / "two").checkpoints[0]
    assert entry["world_size"] == 2 and entry["n_shards"] == 25


def test_bad_input_is_one_line(project, tmp_path, capsys):
    index = str(project / "reference")
    wide = ConceptDirection(torch.randn(48), "blocks.0.hook_resid_post")
    wide.save(tmp_path / "wide.safetensors")
    err = _cli_error(capsys, "index", "query", index, "--direction", str(tmp_path / "wide.safetensors"), "--out",
                     str(tmp_path / "x.safetensors"))
    assert "has size 48, but the model's activations there have width 32" in err
    ConceptDirection(torch.randn(32), "blocks.0.hook_resid_middle").save(tmp_path / "hook.safetensors")
    err = _cli_error(capsys, "index", "query", index, "--direction", str(tmp_path / "hook.safetensors"), "--out",
                     str(tmp_path / "x.safetensors"))
    assert "unknown hook name 'blocks.0.hook_resid_middle'" in err
    broken = tmp_path / "broken"
    shutil.copytree(project / "reference", broken)
    shard = broken / "checkpoints" / "00" / "shards" / "shard-000003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    err = _cli_error(capsys, "index", "query", str(broken), "--out", str(tmp_path / "x.safetensors"))
    assert "shard-000003.safetensors: truncated or unreadable shard" in err

    other = tmp_path / "other"  # a copy of the project whose model is then replaced: the index was built on another
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("reference", "run"))  # (the run names its paths)
    run_stages(("probe",), other / "run", RunConfig.read(other / "run.toml"), progress=False)
    build_from_runs([other / "run"], other / "index", SETTINGS, progress=False)
    adapter = load_model(other / "model")
    with torch.no_grad():
        next(adapter.model.parameters()).mul_(2.0)
    save_model(adapter, other / "model")
    err = _cli_error(capsys, "index", "query", str(other / "index"), "--out", str(tmp_path / "x.safetensors"))
    assert "the model changed since this run started" in err

    lines = (project / "train.jsonl").read_text().splitlines(keepends=True)
    (other / "train.jsonl").write_text("".join(lines[:-1]))  # other data (one line less), in a new run
    with pytest.raises(GradientIndexError, match="train.jsonl: the data changed since the index was built"):
        GradientIndex(other / "index").texts(["0"])  # (what `index query --report` reads)
    run_stages(("probe",), other / "run2", RunConfig.read(other / "run.toml"), progress=False)
    err = _cli_error(capsys, "index", "build", str(other / "run2"), "--out", str(other / "index"), "--projection",
                     "random", "--rank", "4", "--shard-size", "16")
    assert "the index was built on other data (sha256:" in err


def test_a_run_with_checkpoints_is_indexed_at_each_and_summed_as_it_scores(project, tmp_path):
    """A run folder with ``[model] checkpoints`` (a perturbed copy of the model and the model, weights 0.5 and 2) gives
    an index with one checkpoint per point; uncompressed, its query equals the run's own weighted sum of scores."""
    adapter = load_model(project / "model")
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_model(adapter, tmp_path / "perturbed")
    config = tmp_path / "checkpoints.toml"
    config.write_text((project / "run.toml").read_text().replace(
        'path = "model"\n', f'path = "{project / "model"}"\ncheckpoints = ["{tmp_path / "perturbed"}", '
        f'"{project / "model"}"]\nweights = [0.5, 2.0]\n').replace('"train.jsonl"', f'"{project / "train.jsonl"}"')
        .replace('"pos.jsonl"', f'"{project / "pos.jsonl"}"').replace('"neg.jsonl"', f'"{project / "neg.jsonl"}"'))
    run_config(RunConfig.read(config), tmp_path / "run", progress=False)
    index = build_from_runs([tmp_path / "run"], tmp_path / "index", IndexSettings(projection="identity", dtype="float32",
                                                                                 shard_size=64), progress=False)
    assert [e["weight"] for e in index.checkpoints] == [0.5, 2.0]
    out = tmp_path / "q.safetensors"
    assert main(["index", "query", str(tmp_path / "index"), "--out", str(out), "--no-progress"]) == 0
    ref, got = Scores.load(tmp_path / "run" / "scores" / "scores.safetensors"), Scores.load(out)
    assert got.ids == ref.ids and got.estimator == "concept_influence[checkpoints]"
    assert np.abs(got.values - ref.values).max() < 1e-4 * np.abs(ref.values).max()
