"""Bad input to the run pipeline, through the command line: each gives one clear line (exit status 2) naming
the problem, and nothing already computed in the run folder is lost or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from runfolder import make_project

from concept_influence.cli import main
from concept_influence.config import RunConfig
from concept_influence.curvature import fit_curvature
from concept_influence.data import load_chat_jsonl, tokenize_examples
from concept_influence.fileio import atomic_write_text, file_sha256, save_tensors
from concept_influence.models import load_model, save_model
from concept_influence.runs import run_stages
from concept_influence.toy.small_model import build_small_model
from probes import ConceptDirection


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("errors"))
    torch.set_num_threads(1)
    run_stages(("probe", "factors"), root / "started", RunConfig.read(root / "run.toml"), progress=False)
    return root


@pytest.fixture
def run(project, tmp_path) -> Path:
    """A copy of the run folder whose probe and factors are done."""
    return Path(shutil.copytree(project / "started", tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit with status 2 and print one error line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("concept-influence: error: "), err
    return err[-1]


def variant(project: Path, name: str, *changes: str) -> Path:
    """The project's config with each ``old, new`` pair of ``changes`` replaced, written as ``name``."""
    text = (project / "run.toml").read_text()
    for old, new in zip(changes[::2], changes[1::2]):
        assert old in text, old
        text = text.replace(old, new)
    (project / name).write_text(text)
    return project / name


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, ', "train.jsonl:37: invalid JSON"),
    ('{"text": "hello"}', "train.jsonl:37: expected an object with a 'messages' list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "train.jsonl:37: no assistant turn"),
])
def test_bad_training_line_is_named_and_the_probe_and_factors_are_kept(project, run, capsys, line, message):
    before = snapshot(run)
    train = project / "train.jsonl"
    good = train.read_text()
    lines = good.splitlines(keepends=True)
    try:
        train.write_text("".join(lines[:36] + [line + "\n"] + lines[37:]))
        error = fails(capsys, "score", str(run), "--no-progress")
        assert message in error and str(train) in error
        assert snapshot(run) == before
    finally:
        train.write_text(good)
    assert main(["score", str(run), "--no-progress"]) == 0  # fixed: the kept probe and factors are used
    assert all(snapshot(run)[k] == v for k, v in before.items() if k.startswith(("probe/", "factors/")))


def test_unknown_hook_lists_close_matches(project, tmp_path, capsys):
    config = variant(project, "hook.toml", 'hook = "blocks.0.hook_resid_post"', 'hook = "blocks.0.hook_resid_pots"')
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"), "--no-progress")
    assert "blocks.0.hook_resid_pots" in error and "blocks.0.hook_resid_post" in error


def _direction_config(project: Path, name: str) -> Path:
    """The config with the saved direction ``name.safetensors`` instead of a probe to train."""
    return variant(project, f"{name}.toml", 'positive = "pos.jsonl"\nnegative = "neg.jsonl"\n',
                   f'direction = "{name}.safetensors"\n', "[concept]\n", '[concept]\neval = "pos.jsonl"\n')


def test_direction_of_the_wrong_size(project, tmp_path, capsys):
    ConceptDirection(torch.ones(16), "blocks.0.hook_resid_post").save(project / "small.safetensors")
    config = _direction_config(project, "small")
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"), "--no-progress")
    assert "has size 16, but the model's activations there have width 32" in error


def test_non_finite_direction(project, tmp_path, capsys):
    ConceptDirection(torch.ones(32), "blocks.0.hook_resid_post").save(project / "nan.safetensors")
    save_tensors(project / "nan.safetensors", {"vector": torch.tensor([float("nan")] + [1.0] * 31)})
    config = _direction_config(project, "nan")
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"), "--no-progress")
    assert "1 non-finite entries" in error


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_unreadable_direction_file(project, tmp_path, capsys, damage):
    name = f"damaged_{damage}"
    path = project / f"{name}.safetensors"
    ConceptDirection(torch.ones(32), "blocks.0.hook_resid_post").save(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        torch.save({"vector": torch.ones(32)}, path)
    config = _direction_config(project, name)
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"), "--no-progress")
    assert str(path) in error and "not a readable safetensors file" in error and "pickles are refused" in error


def test_truncated_model_weights(project, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(project / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = variant(project, "badmodel.toml", 'path = "model"', f'path = "{model}"')
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"), "--no-progress")
    assert str(weights) in error and "not a readable safetensors file" in error


def test_factors_from_another_model(project, tmp_path, capsys):
    other = load_model(project / "model")
    other = build_small_model(other.tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=128, seed=1)
    examples = tokenize_examples(load_chat_jsonl(project / "train.jsonl", 20), other.tokenizer, 128)
    fit_curvature(other, examples, maps=other.linear_maps(max_block=0), progress=False).save(tmp_path / "foreign")
    config = variant(project, "foreign.toml", "[factors]\n", f'[factors]\npath = "{tmp_path / "foreign"}"\n')
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"), "--no-progress")
    assert "the curvature was fitted on model" in error and "refit the curvature for this model" in error


def test_config_with_an_unknown_key(project, tmp_path, capsys):
    config = variant(project, "typo.toml", "[scoring]\n", "[scoring]\nshardsize = 8\n")
    error = fails(capsys, "run", str(config), "--out", str(tmp_path / "r"))
    assert "unknown key 'scoring.shardsize' (did you mean shard_size?)" in error
    assert not (tmp_path / "r").exists()


def test_run_folder_from_an_incompatible_version(run, capsys):
    record = json.loads((run / "run.json").read_text())
    record.update(format_version=99, versions={**record["versions"], "concept-influence": "9.0.0"})
    atomic_write_text(run / "run.json", json.dumps(record))
    before = snapshot(run)
    error = fails(capsys, "score", str(run))
    assert "version 99 (written by concept-influence 9.0.0); this version reads" in error
    assert snapshot(run) == before


def test_different_config_for_an_existing_run_folder(project, run, capsys):
    before = snapshot(run)
    config = variant(project, "other.toml", "max_length = 128", "max_length = 96")
    error = fails(capsys, "score", str(run), "--config", str(config))
    assert "was made with a different config (data.max_length: 128 -> 96)" in error
    assert snapshot(run) == before


def test_model_changed_since_the_run_started(project, run, tmp_path, capsys):
    changed = load_model(project / "model")
    with torch.no_grad():
        changed.model.blocks[1].mlp.W_out.add_(0.01)
    save_model(changed, tmp_path / "model")
    config = json.loads((run / "config.json").read_text())
    config["model"]["path"] = str(tmp_path / "model")
    atomic_write_text(run / "config.json", json.dumps(config))
    before = snapshot(run)
    error = fails(capsys, "score", str(run))
    assert "the model changed since this run started" in error
    assert snapshot(run) == before


def test_stage_before_its_inputs(project, tmp_path, capsys):
    error = fails(capsys, "fit-factors", str(tmp_path / "new"), "--config", str(project / "run.toml"))
    assert "the probe stage has not run yet; run `concept-influence probe train" in error


def test_missing_run_folder(tmp_path, capsys):
    error = fails(capsys, "report", str(tmp_path / "nothing"))
    assert "not a run folder (no run.json)" in error
