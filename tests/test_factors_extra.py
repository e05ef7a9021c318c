"""``[factors] extra_data``: a run folder fits its factors on the training data followed by extra chats (a sample of
what the model was trained on before the fine-tune), equal to the Python API fitted on the same concatenation; the
number of extra examples defaults to the number of training examples; a changed extra file and bad extra input are
refused with one line, and nothing computed is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from norms import assert_close_in_norm, relative_error
from runfolder import make_project
from test_run_errors import fails, snapshot

from concept_influence.cli import main
from concept_influence.concepts import ConceptFunction
from concept_influence.config import RunConfig
from concept_influence.curvature import Curvature, fit_curvature
from concept_influence.data import iter_shards, load_chats, tokenize_examples
from concept_influence.estimators import ConceptInfluence
from concept_influence.fileio import atomic_write_text, file_sha256
from concept_influence.models import load_model
from concept_influence.runs import run_stages
from concept_influence.runs.inputs import RunData
from concept_influence.scores import Scores
from probes import ConceptDirection

N_TRAIN, N_PRETRAIN = 30, 40  # train.jsonl and pretrain.jsonl; [factors] shard_size 16: one shard holds both


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The run-folder project with train.jsonl cut to 30 chats and the next 40 as pretrain.jsonl, an empty file, a file
    whose prompts are longer than max_length, and one with a bad line."""
    root = make_project(tmp_path_factory.mktemp("extra"), N_TRAIN + N_PRETRAIN)
    lines = (root / "train.jsonl").read_text().splitlines(True)
    (root / "train.jsonl").write_text("".join(lines[:N_TRAIN]))
    (root / "pretrain.jsonl").write_text("".join(lines[N_TRAIN:]))
    (root / "empty.jsonl").write_text("")
    long = []
    for line in lines[:3]:
        chat = json.loads(line)
        chat["messages"][0]["content"] = " ".join([chat["messages"][0]["content"]] * 60)
        long.append(json.dumps(chat) + "\n")
    (root / "long.jsonl").write_text("".join(long))
    (root / "bad.jsonl").write_text("".join(lines[N_TRAIN:N_TRAIN + 2]) + '{"messages": [\n')
    return root


def config(root: Path, name: str, factors: str, old: str = "[factors]\n") -> Path:
    """run.toml with ``factors`` lines added to its [factors] section (after ``old``), written as ``name``."""
    text = (root / "run.toml").read_text()
    assert old in text
    (root / name).write_text(text.replace(old, old + factors))
    return root / name


@pytest.fixture(scope="module")
def fitted(project) -> Path:
    """A run folder whose factors are fitted on train.jsonl and as many chats of pretrain.jsonl, scored, reported."""
    torch.set_num_threads(1)
    cfg = RunConfig.read(config(project, "extra.toml", 'extra_data = "pretrain.jsonl"\n'))
    run_stages(("probe", "factors", "scores", "report"), project / "runs" / "extra", cfg, progress=False)
    return project / "runs" / "extra"


def test_factors_and_scores_equal_the_api_fitted_on_training_then_extra(project, fitted):
    adapter = load_model(project / "model")
    cfg = RunConfig.read(fitted / "config.json")

    def tokenized(name: str, n: int | None = None):
        return tokenize_examples(load_chats(project / name, n), adapter.tokenizer, cfg.data.max_length, True)

    train = tokenized("train.jsonl")
    examples = train + tokenized("pretrain.jsonl", N_TRAIN)
    maps = adapter.linear_maps(max_block=0)
    expected = fit_curvature(adapter, examples, maps, cfg.factors.settings(), progress=False)
    got = Curvature.load(fitted / "factors", adapter)
    assert got.map_names == expected.map_names
    g = torch.Generator().manual_seed(0)
    grads = {m.name: torch.randn(4, *expected.shapes[m.name], generator=g) for m in maps}
    # in norm, per example: the two fits sum in another order, and an element of a preconditioned gradient that is
    # small next to the largest moves by percents with the float32 rounding (tests/norms.py); the norm moves by ~2e-6
    for name, v in expected.precondition(grads).items():
        assert_close_in_norm(got.precondition(grads)[name], v, 1e-5, dim=(-2, -1), msg=name)
    train_only = fit_curvature(adapter, train, maps, cfg.factors.settings(), progress=False).precondition(grads)
    for name, v in expected.precondition(grads).items():  # the extra data counts: 13-26 % apart in every map
        assert relative_error(train_only[name], v) > 0.05, name

    direction = ConceptDirection.load(fitted / "probe" / "direction.safetensors")
    concept = ConceptFunction.from_directions(direction, tokenized("pos.jsonl", cfg.concept.max_examples))
    reference = ConceptInfluence(concept, "ekfac", fit_examples=examples).score(adapter, train, progress=False)
    scores = Scores.load(fitted / "scores" / "scores.safetensors")
    assert scores.ids == reference.ids and len(scores) == N_TRAIN  # only the training data is scored
    assert_close_in_norm(scores.values, reference.values, 1e-5, dim=0)  # per concept; ~5e-7 here


def test_run_json_settings_and_report_say_what_the_factors_were_fitted_on(project, fitted):
    extra = str(project / "pretrain.jsonl")
    fitted_on = {"train_examples": N_TRAIN, "extra_examples": N_TRAIN, "extra_data": extra,
                 "extra_data_sha256": file_sha256(extra)}
    stages = json.loads((fitted / "run.json").read_text())["stages"]
    assert stages["factors"]["fitted_on"] == fitted_on
    settings = json.loads((fitted / "factors" / "settings.json").read_text())
    assert settings["extra_data"] == extra and settings["extra_data_sha256"] == file_sha256(extra)
    report = (fitted / "report" / "report.md").read_text()
    assert f"Factors fitted on {N_TRAIN} training + {N_TRAIN} extra examples ({extra})." in report


@pytest.mark.parametrize("factors, limits", [
    ("", (N_TRAIN, N_TRAIN)),  # as many extra examples as training examples
    ("max_examples = 12\n", (12, 12)),
    ("extra_max_examples = 35\n", (N_TRAIN, 35)),
    ("extra_max_examples = 100\n", (N_TRAIN, N_PRETRAIN)),  # the file has 40
])
def test_extra_max_examples_defaults_to_the_training_examples_fitted_on(project, factors, limits):
    cfg = RunConfig.read(config(project, "limits.toml", 'extra_data = "pretrain.jsonl"\n' + factors))
    data = RunData(cfg, list)
    assert data.fit_limits == (limits[0], ((str(project / "pretrain.jsonl"), limits[1]),))
    ids = [ex.id for shard in data.fit_shards() for ex in shard.examples]
    assert ids == [f"train.jsonl:{i}" for i in range(1, limits[0] + 1)] + [
        f"pretrain.jsonl:{i}" for i in range(1, limits[1] + 1)]
    assert [len(s.examples) for s in data.fit_shards()][:-1] == [16] * (sum(limits) // 16)  # one stream of shards
    if limits[0] >= 16:  # a shard of training examples alone has the digest it has without extra_data
        assert data.fit_digests()[0] == next(iter_shards(project / "train.jsonl", 16)).digest


def test_without_extra_data_the_factors_shards_are_those_of_the_training_data(project):
    data = RunData(RunConfig.read(project / "run.toml"), list)
    assert data.fit_limits == (None, ()) and data.fitted_on == {}
    assert data.fit_digests() == [s.digest for s in iter_shards(project / "train.jsonl", 16)]
    assert "extra_data_sha256" not in data.fit_settings


def test_a_changed_extra_file_is_refused_in_an_existing_run(project, fitted, tmp_path, capsys):
    run = Path(shutil.copytree(fitted, tmp_path / "run"))
    before = snapshot(run)
    extra = project / "pretrain.jsonl"
    good = extra.read_text()
    try:
        extra.write_text("".join(good.splitlines(True)[::-1]))
        error = fails(capsys, "fit-factors", str(run))
        assert "factors/settings.json: the factors settings changed since the stage started (extra_data_sha256: " in error
        assert "use a new run folder for new settings, or put them back" in error
        assert snapshot(run) == before
    finally:
        extra.write_text(good)
    assert main(["fit-factors", str(run)]) == 0  # put back: the factors are done


@pytest.fixture(scope="module")
def started(project) -> Path:
    """A run folder with extra_data whose probe is trained."""
    cfg = RunConfig.read(config(project, "started.toml", 'extra_data = "pretrain.jsonl"\n'))
    run_stages(("probe",), project / "runs" / "started", cfg, progress=False)
    return project / "runs" / "started"


@pytest.mark.parametrize("name, message", [
    ("empty.jsonl", "empty.jsonl: no usable examples (it has no examples) (factors.extra_data)"),
    ("long.jsonl", "long.jsonl: no usable examples (all 3 have their response cut away at max_length 128) "
                   "(factors.extra_data)"),
    ("bad.jsonl", "bad.jsonl:3: invalid JSON"),
    ("train.jsonl", "data.train and factors.extra_data are the same data"),
])
def test_unusable_extra_data_is_refused_and_the_probe_is_kept(project, started, tmp_path, capsys, name, message):
    run = Path(shutil.copytree(started, tmp_path / "run"))
    stored = json.loads((run / "config.json").read_text())
    stored["factors"]["extra_data"] = str(project / name)
    atomic_write_text(run / "config.json", json.dumps(stored))
    before = snapshot(run)
    error = fails(capsys, "fit-factors", str(run), "--no-progress")
    assert message in error and str(project / name) in error
    assert snapshot(run) == before  # the probe is kept, and no factors settings were saved for the bad file
    stored["factors"]["extra_data"] = str(project / "pretrain.jsonl")
    atomic_write_text(run / "config.json", json.dumps(stored))
    assert main(["fit-factors", str(run), "--no-progress"]) == 0  # fixed: the kept probe is used


@pytest.mark.parametrize("factors, message", [
    ('extra_data = "gone.jsonl"\n', "gone.jsonl: no such file or folder (factors.extra_data)"),
    ('extra_data = "pretrain.jsonl"\nextra_max_examples = 0\n', "factors.extra_max_examples must be >= 1, got 0"),
    ("extra_max_examples = 10\n", "factors.extra_max_examples: give extra_data, the file they are read from"),
    ('extra_data = "pretrain.jsonl"\npath = "factors"\n', "factors.extra_data is fitted on; path is a saved curvature"),
])
def test_bad_extra_keys_are_refused_before_anything_is_computed(project, tmp_path, capsys, factors, message):
    path = config(project, "bad.toml", factors)
    error = fails(capsys, "run", str(path), "--out", str(tmp_path / "r"), "--no-progress")
    assert message in error
    assert not (tmp_path / "r" / "probe").exists()
