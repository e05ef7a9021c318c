"""Run folders: layout and record, equality with in-memory scoring, shard invariance, replay, resume after
SIGKILL, a full disk, and every bad input the pipeline names."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runfolder import N_TRAIN, in_memory_inputs, start_and_kill

from concept_influence.cli import main
from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import CurvatureSettings, fit_curvature
from concept_influence.data import load_chat_jsonl, load_chats, tokenize_examples
from concept_influence.engine import ScoringSettings
from concept_influence.estimators import ConceptInfluence, ProbeProjection
from concept_influence.fileio import file_sha256
from concept_influence.filtering import sidecar_path
from concept_influence.models import load_model
from concept_influence.runs import RUN_FORMAT_VERSION, Run, RunError, run_config, run_stages
from concept_influence.runs.inputs import LATER_KEYS
from concept_influence.scores import Scores

# (the fixtures project and finished, a run-folder project and its reference run: tests/conftest.py)


def edited_config(project: Path, old: str, new: str, name: str) -> Path:
    """The project's config with ``old`` replaced by ``new``, written as ``name``."""
    path = project / name
    text = (project / "run.toml").read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


# ---- config ------------------------------------------------------------------------------------------
def test_config_resolves_relative_paths_against_its_folder(project):
    cfg = RunConfig.read(project / "run.toml")
    assert cfg.model.path == str(project / "model")
    assert cfg.data.train == str(project / "train.jsonl")
    assert cfg.concept_eval == str(project / "pos.jsonl")  # default: the probe's positive texts
    assert cfg.factors.strategy == "ekfac" and cfg.scoring.estimator == "concept_influence"


@pytest.mark.parametrize("old, new, message", [
    ("[scoring]\n", "[scoring]\nbatchsize = 4\n", "unknown key 'scoring.batchsize' (did you mean batch_size"),
    ("[concept]\n", "[reprot]\ntop_k = 3\n[concept]\n", "unknown key 'reprot' (did you mean report?)"),
])
def test_config_unknown_key(project, old, new, message):
    path = edited_config(project, old, new, "typo.toml")
    with pytest.raises(ConfigError) as e:
        RunConfig.read(path)
    assert str(path) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("old, new, message", [
    ('max_length = 128', 'max_length = "long"', "'data.max_length' must be an integer, got 'long'"),
    ('kind = "diff_means"', 'kind = "svm"', "'probe.kind' must be one of logistic, diff_means; got 'svm'"),
    ('[model]\npath = "model"\n', '[model]\n', "missing key 'model.path'"),
    ('shard_size = 16\n\n[scoring]', 'shard_size = 0\n\n[scoring]', "factors.shard_size must be >= 1, got 0"),
    ('negative = "neg.jsonl"\n', '', "give either `direction` (a saved direction) or both `positive` and `negative`"),
])
def test_config_bad_values(project, old, new, message):
    with pytest.raises(ConfigError, match="bad.toml") as e:
        RunConfig.read(edited_config(project, old, new, "bad.toml"))
    assert message in str(e.value)


def test_config_unparsable(project):
    path = project / "broken.toml"
    path.write_text("[model\npath = 1")
    with pytest.raises(ConfigError, match="broken.toml: cannot parse"):
        RunConfig.read(path)


# ---- a finished run ----------------------------------------------------------------------------------
def test_run_folder_describes_itself(finished, project):
    record = json.loads((finished / "run.json").read_text())
    assert record["format_version"] == RUN_FORMAT_VERSION
    assert set(record["stages"]) == {"probe", "check", "factors", "scores", "report"}
    assert record["versions"]["torch"] == torch.__version__
    assert record["fingerprints"]["model"] == load_model(project / "model").fingerprint()
    assert record["stages"]["scores"]["data_sha256"] == file_sha256(project / "train.jsonl")
    manifest = json.loads((finished / "manifest.json").read_text())["files"]
    for rel in ("config.json", "probe/direction.safetensors", "check/concept_check.json", "check/concept_check.png",
                "factors/settings.json", "factors/curvature.safetensors",
                "factors/statistics/covariance.safetensors", "scores/settings.json", "scores/scores.safetensors",
                "scores/shards/shard-000006.json",
                "report/report.md", "report/score_distribution.png"):
        assert rel in manifest, rel
    assert manifest["scores/scores.safetensors"]["sha256"] == file_sha256(finished / "scores/scores.safetensors")
    assert not list((finished / "factors" / "partial").glob("*"))  # checkpoints are gone once the fit is done
    assert not [p for p in finished.rglob(".*.tmp")]  # no temporary file left behind


def test_report_shows_top_examples_with_text(finished, project):
    scores = Scores.load(finished / "scores" / "scores.safetensors")
    report = (finished / "report" / "report.md").read_text()
    texts = {e.id: e.response for e in load_chat_jsonl(project / "train.jsonl")}
    top_id = scores.top(1)[0][0]
    bottom_id = scores.bottom(1)[0][0]
    assert top_id in report and bottom_id in report
    assert " ".join(texts[top_id].split())[:30] in " ".join(report.split())


def test_sharded_run_equals_in_memory_scoring(finished, project):
    """Shards (16 examples, the last 4), checkpointed passes and the merge give the scores of one
    in-memory fit and one in-memory scoring pass."""
    adapter, train, concept = in_memory_inputs(project, finished)
    curvature = fit_curvature(adapter, train, maps=adapter.linear_maps(max_block=0), progress=False)
    expected = ConceptInfluence(concept, curvature).score(adapter, train, progress=False)
    got = Scores.load(finished / "scores" / "scores.safetensors")
    assert got.ids == expected.ids and len(got) == N_TRAIN
    err = np.abs(got.values - expected.values).max() / np.abs(expected.values).max()
    assert err < 1e-5, err


def test_fast_path_run_equals_in_memory(project, finished, tmp_path):
    path = edited_config(project, "[scoring]\n", '[scoring]\nestimator = "probe_projection"\n', "fast.toml")
    run_config(RunConfig.read(path), tmp_path / "fast", progress=False)
    adapter, train, concept = in_memory_inputs(project, finished)
    expected = ProbeProjection(concept).score(adapter, train, progress=False)
    got = Scores.load(tmp_path / "fast" / "scores" / "scores.safetensors")
    assert got.ids == expected.ids
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-6, atol=1e-6)
    assert not (tmp_path / "fast" / "factors" / "curvature.json").exists()  # the fast path fits nothing


def test_replay_from_the_run_folder_gives_identical_scores(finished, tmp_path):
    """`run RUN/config.json --out NEW` reproduces the run bit for bit."""
    run_config(RunConfig.read(finished / "config.json"), tmp_path / "replay", progress=False)
    a = Scores.load(finished / "scores" / "scores.safetensors")
    b = Scores.load(tmp_path / "replay" / "scores" / "scores.safetensors")
    assert a.ids == b.ids and np.array_equal(a.values, b.values)


def test_running_a_finished_run_again_recomputes_nothing(finished):
    before = {p: p.stat().st_mtime_ns for p in (finished / "scores").rglob("*.safetensors")}
    before[finished / "factors" / "curvature.safetensors"] = (finished / "factors" / "curvature.safetensors").stat().st_mtime_ns
    run_config(RunConfig.read(finished / "config.json"), progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_each_stage_saves_its_settings(finished):
    """factors/settings.json and scores/settings.json hold the config's [factors] and [scoring] sections, and
    read back as the settings the API takes."""
    cfg = RunConfig.read(finished / "config.json")
    for folder, section, settings_class in (("factors", cfg.factors, CurvatureSettings),
                                            ("scores", cfg.scoring, ScoringSettings)):
        saved = json.loads((finished / folder / "settings.json").read_text())
        gates = {"require"} if folder == "scores" else set()  # scoring.require stops a run and changes no score
        later = LATER_KEYS if folder == "factors" else {}  # (left out at their defaults: older folders resume)
        assert saved == {k: v for k, v in section.to_dict().items() if k not in gates and later.get(k, ...) != v}
        assert type(section)(**saved).settings() == section.project(settings_class) == section.settings()
    assert cfg.factors.settings() == CurvatureSettings()  # the project's config keeps the defaults


def test_a_changed_setting_is_refused_by_name_when_a_stage_resumes(finished, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(finished, edited)
    config = json.loads((edited / "config.json").read_text())
    config["factors"]["damping_factor"] = 0.2
    config["scoring"]["batch_size"] = 3
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError) as e:
        run_stages(("factors",), edited, progress=False)
    assert "factors/settings.json" in str(e.value) and "damping_factor: 0.1 -> 0.2" in str(e.value)
    with pytest.raises(RunError) as e:
        run_stages(("scores",), edited, progress=False)
    assert "scores/settings.json" in str(e.value) and "batch_size: 8 -> 3" in str(e.value)
    assert "damping_factor" not in str(e.value)  # the scoring stage names only its own settings


def test_scoring_settings_reach_the_estimator_and_the_merge(finished, project, tmp_path):
    """[scoring] per_module/per_token (ScoringSettings) are kept per shard and merged in data order."""
    direction, factors = finished / "probe" / "direction.safetensors", finished / "factors"
    path = edited_config(project, 'positive = "pos.jsonl"\nnegative = "neg.jsonl"\nkind = "diff_means"\n',
                         f'direction = "{direction}"\n', "per_module.toml")
    path.write_text(path.read_text().replace("[factors]\n", f'[factors]\npath = "{factors}"\n')
                    .replace("[scoring]\n", "[scoring]\nper_module = true\nper_token = true\n")
                    .replace("[concept]\n", '[concept]\neval = "pos.jsonl"\n'))
    run_config(RunConfig.read(path), tmp_path / "per_module", progress=False)
    got = Scores.load(tmp_path / "per_module" / "scores" / "scores.safetensors")
    reference = Scores.load(finished / "scores" / "scores.safetensors")
    assert got.ids == reference.ids
    # (float32 rounding: per_token dots each token with the queries; the reference, which scores the stability variants
    # as five more query columns, goes through each example's gradient, the cheaper contraction for six columns)
    np.testing.assert_allclose(got.values, reference.values, rtol=1e-6, atol=1e-5 * np.abs(reference.values).max())
    np.testing.assert_allclose(sum(got.per_module.values()), got.values, rtol=1e-6, atol=1e-9)
    assert set(got.per_token) == set(got.ids)
    np.testing.assert_allclose(got.per_token[got.ids[-1]].sum(0), got.values[-1], rtol=1e-6, atol=1e-9)


# ---- resume --------------------------------------------------------------------------------------------
def test_scoring_killed_with_sigkill_resumes_to_identical_scores(project, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(project, big, ignore=shutil.ignore_patterns("runs"))
    # more data so the kill lands mid-run: the train file four times over
    (big / "train.jsonl").write_text((project / "train.jsonl").read_text() * 4)
    # probe and factors once, in this process; a copy of the folder is scored without interruption
    run_stages(("probe", "factors"), big / "killed", RunConfig.read(big / "run.toml"), progress=False)
    shutil.copytree(big / "killed", big / "uninterrupted")
    run_stages(("scores",), big / "uninterrupted", progress=False)
    shards = big / "killed" / "scores" / "shards"
    start_and_kill(["score", "killed", "--no-progress"], big, lambda: (shards / "shard-000002.json").exists())
    done = sorted(shards.glob("shard-*.json"))
    assert 3 <= len(done) < 25, "killed after the third shard and before the last"
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    run_stages(("scores",), big / "killed", progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "finished shards were not recomputed"
    a = Scores.load(big / "uninterrupted" / "scores" / "scores.safetensors")
    b = Scores.load(big / "killed" / "scores" / "scores.safetensors")
    assert a.ids == b.ids and len(a) == 4 * N_TRAIN
    assert np.array_equal(a.values, b.values)


def test_factor_fit_killed_with_sigkill_resumes_to_identical_factors(project, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(project, big, ignore=shutil.ignore_patterns("runs"))
    (big / "train.jsonl").write_text((project / "train.jsonl").read_text() * 4)
    # the probe once, in this process; a copy of the folder fits its factors without interruption
    run_stages(("probe",), big / "killed", RunConfig.read(big / "run.toml"), progress=False)
    shutil.copytree(big / "killed", big / "uninterrupted")
    run_stages(("factors",), big / "uninterrupted", progress=False)
    partial = big / "killed" / "factors" / "partial"

    def second_pass_started() -> bool:  # killed inside the eigenvalue pass, after its first checkpoint
        return (partial / "eigenvalues-rank0of1.safetensors").exists()

    start_and_kill(["fit-factors", "killed", "--no-progress"], big, second_pass_started)
    assert (big / "killed" / "factors" / "statistics" / "covariance.safetensors").exists()
    assert not (big / "killed" / "factors" / "curvature.json").exists()
    run_stages(("factors",), big / "killed", progress=False)
    for name in ("curvature.safetensors", "statistics/covariance.safetensors", "statistics/eigenvalues.safetensors"):
        assert file_sha256(big / "uninterrupted" / "factors" / name) == file_sha256(big / "killed" / "factors" / name), name


def test_disk_full_while_writing_a_shard_keeps_earlier_shards(finished, project, tmp_path, monkeypatch):
    out = tmp_path / "full"
    cfg = RunConfig.read(project / "run.toml")
    run_stages(("probe", "factors"), out, cfg, progress=False)
    from concept_influence import scores as scores_module

    real_save, calls = scores_module.save_tensors, []

    def failing_save(path, *args, **kwargs):
        calls.append(path)
        if "shard-000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(scores_module, "save_tensors", failing_save)
    with pytest.raises(RunError) as e:
        run_stages(("scores",), out, progress=False)
    message = str(e.value)
    assert "shard-000003.safetensors" in message and "the disk is full" in message
    assert "3 shards this process finished before it are intact" in message and "run the same command again" in message
    shards = sorted((out / "scores" / "shards").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-00000{i}.safetensors" for i in range(3)]
    assert not list((out / "scores" / "shards").glob(".*.tmp"))
    reference = Scores.load(finished / "scores" / "shards" / "shard-000001.safetensors")
    assert np.array_equal(Scores.load(shards[1]).values, reference.values)
    monkeypatch.setattr(scores_module, "save_tensors", real_save)
    run_stages(("scores",), out, progress=False)  # space is back: resume
    a = Scores.load(finished / "scores" / "scores.safetensors")
    b = Scores.load(out / "scores" / "scores.safetensors")
    assert a.ids == b.ids and np.array_equal(a.values, b.values)


def test_unreadable_shard_is_recomputed(finished, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    (out / "scores" / "scores.safetensors").unlink()
    out_run = Run.open(out)
    out_run.update_record(lambda info: info["stages"].pop("scores"))
    shard = out / "scores" / "shards" / "shard-000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="shard-000002.safetensors: unreadable shard"):
        run_stages(("scores",), out, progress=False)
    a = Scores.load(finished / "scores" / "scores.safetensors")
    b = Scores.load(out / "scores" / "scores.safetensors")
    assert np.array_equal(a.values, b.values)


def test_memory_benchmark_reports_peak_rss_per_size(tmp_path):
    from concept_influence_benchmarks.memory import run_memory_benchmark

    result = run_memory_benchmark(tmp_path / "out", sizes=(30, 60), estimators=("probe_projection",),
                                  work=tmp_path / "work")
    assert [r["examples"] for r in result["rows"]] == [30, 60]
    assert all(100 < r["peak_rss_mib"] < 20000 for r in result["rows"])
    ratio = result["rows"][1]["peak_rss_mib"] / result["rows"][0]["peak_rss_mib"]
    assert result["peak_ratio"]["probe_projection"] == pytest.approx(ratio)
    assert "| probe_projection | 60 |" in (tmp_path / "out" / "memory.md").read_text()
    assert not (tmp_path / "work").exists()


def test_examples_cut_away_at_max_length_are_skipped_and_counted(project, tmp_path):
    adapter = load_model(project / "model")
    train = load_chat_jsonl(project / "train.jsonl")
    prompt_lengths = [tokenize_examples([e], adapter.tokenizer, 512)[0].response_start for e in train]
    limit = int(np.median(prompt_lengths))
    expected_skipped = sum(n >= limit for n in prompt_lengths)
    assert 0 < expected_skipped < len(train)
    config = edited_config(project, "max_length = 128", f"max_length = {limit}", "short.toml")
    config.write_text(config.read_text().replace("[scoring]\n", '[scoring]\nestimator = "probe_projection"\n'))
    run_config(RunConfig.read(config), tmp_path / "short", progress=False)
    scores = Scores.load(tmp_path / "short" / "scores" / "scores.safetensors")
    assert len(scores) == len(train) - expected_skipped
    assert scores.metadata["n_skipped"] == expected_skipped
    assert f"{expected_skipped} skipped because their response was cut away" in (
        tmp_path / "short" / "report" / "report.md").read_text()


def test_outputs_saved_just_before_a_kill_are_adopted(finished, tmp_path):
    """A direction or curvature written but not yet recorded in run.json (killed in between) is used as is."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    kept = {p: file_sha256(out / p) for p in ("probe/direction.safetensors", "factors/curvature.safetensors")}
    Run.open(out).update_record(lambda info: [info["stages"].pop(s) for s in ("probe", "factors")])
    run_stages(("probe", "factors"), out, progress=False)
    assert Run.open(out).is_done("probe") and Run.open(out).is_done("factors")
    assert all(file_sha256(out / p) == h for p, h in kept.items())


# ---- training data kept as Parquet -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parquet_run(finished, project) -> Path:
    """The project's training chats and probe texts as Parquet (row groups of 7), scored in shards of 16 with the
    finished run's direction and curvature."""
    for name in ("train", "pos"):
        records = [{"messages": list(e.messages)} for e in load_chats(project / f"{name}.jsonl")]
        pq.write_table(pa.Table.from_pylist(records), project / f"{name}.parquet", row_group_size=7)
    path = edited_config(project, 'positive = "pos.jsonl"\nnegative = "neg.jsonl"\nkind = "diff_means"\n',
                         f'direction = "{finished / "probe" / "direction.safetensors"}"\n', "parquet.toml")
    path.write_text(path.read_text().replace('train = "train.jsonl"', 'train = "train.parquet"')
                    .replace("[factors]\n", f'[factors]\npath = "{finished / "factors"}"\n')
                    .replace("[concept]\n", '[concept]\neval = "pos.parquet"\n'))
    run_config(RunConfig.read(path), project / "runs" / "parquet", progress=False)
    return project / "runs" / "parquet"


def test_a_run_on_parquet_scores_like_the_run_on_jsonl(parquet_run, finished, project):
    got = Scores.load(parquet_run / "scores" / "scores.safetensors")
    reference = Scores.load(finished / "scores" / "scores.safetensors")
    assert got.ids == [i.replace("train.jsonl:", "train.parquet:") for i in reference.ids] and len(got) == N_TRAIN
    np.testing.assert_allclose(got.values, reference.values, rtol=1e-6, atol=1e-9)
    assert Run.open(parquet_run).record["stages"]["scores"]["data_sha256"] == file_sha256(project / "train.parquet")
    assert f"`{got.top(1)[0][0]}`" in (parquet_run / "report" / "report.md").read_text()


def test_a_run_on_parquet_resumes_from_its_shards(parquet_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(parquet_run, out)
    (out / "scores" / "scores.safetensors").unlink()
    Run.open(out).update_record(lambda info: info["stages"].pop("scores"))
    shards = sorted((out / "scores" / "shards").glob("shard-*.safetensors"))
    shards[2].unlink()
    kept = {p: p.stat().st_mtime_ns for p in shards if p.exists()}
    run_stages(("scores",), out, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "shards of unchanged rows were recomputed"
    a = Scores.load(parquet_run / "scores" / "scores.safetensors")
    assert np.array_equal(Scores.load(out / "scores" / "scores.safetensors").values, a.values)


def test_cli_filter_writes_the_parquet_back_without_the_top(parquet_run, project, tmp_path, capsys):
    scores = parquet_run / "scores" / "scores.safetensors"
    out = tmp_path / "filtered.parquet"
    assert main(["filter", str(scores), str(project / "train.parquet"), str(out), "--remove-top", "5"]) == 0
    assert f"removed 5 of {N_TRAIN} examples" in capsys.readouterr().out
    removed = {r["id"] for r in json.loads(sidecar_path(out).read_text())["removed_examples"]}
    assert removed == {i for i, _ in Scores.load(scores).top(5)}
    kept = [e.messages for e in load_chats(project / "train.parquet") if e.id not in removed]
    assert [e.messages for e in load_chats(out)] == kept and len(kept) == N_TRAIN - 5
    assert main(["filter", str(scores), str(project / "train.jsonl"), str(tmp_path / "x.jsonl"), "--remove-top", "1"]) == 2
    assert "the scores do not match" in capsys.readouterr().err
