"""Factors per map on disk (issue 27, item 3): a curvature saved one file per map is read back one map at a time, its
streamed preconditioning equals the in-memory one and never holds two maps' factors; folders of one tensor file still
load; bad files are errors naming the file and are never unpickled; ``covariance_dtype`` float64 / bfloat16."""

from __future__ import annotations

import gc
import json
import pickle
import weakref

import pytest
import torch
from norms import assert_close_in_norm

from concept_influence.curvature import (
    Curvature,
    CurvatureError,
    CurvatureSettings,
    EKFACCurvature,
    collect_covariance_stats,
    fit_curvature,
)
from concept_influence.curvature.stored import StoredFactors, map_file
from concept_influence.curvature.unrolled import Horizon, UnrolledCurvature
from concept_influence.fileio import load_tensors, save_tensors


@pytest.fixture
def fitted(tl_adapter, tokenized):
    return fit_curvature(tl_adapter, tokenized[:6], strategy="ekfac", batch_size=3, progress=False)


def _grads(curvature, k: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(k, *s, generator=g) for n, s in curvature.shapes.items()}


def test_saved_per_map_is_one_file_per_map_and_preconditions_as_in_memory(fitted, tmp_path):
    fitted.save(tmp_path / "c", per_map=True)
    config = json.loads((tmp_path / "c" / "curvature.json").read_text())
    assert config["storage"] == "maps" and config["format_version"] == 2
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["curvature.json", "maps"]
    assert [e["file"] for e in config["maps"]] == [map_file(n) for n in fitted.shapes]
    assert len(list((tmp_path / "c" / "maps").iterdir())) == len(fitted.shapes)
    loaded = Curvature.load(tmp_path / "c")
    assert isinstance(loaded, EKFACCurvature) and loaded.streams and isinstance(loaded.factors, StoredFactors)
    assert loaded.shapes == fitted.shapes and loaded.dampings == fitted.dampings  # (no factor read for these)
    grads = _grads(fitted)
    got, want = loaded.precondition(grads), fitted.precondition(grads)
    for name in grads:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    variant = loaded.with_damping(damping_factor=1.0)  # a variant shares the stored factors
    assert variant.factors is loaded.factors
    assert_close_in_norm(variant.precondition(grads)[name], fitted.with_damping(damping_factor=1.0).precondition(grads)[name],
                         1e-7)


def test_streamed_preconditioning_holds_one_map_at_a_time(fitted, tmp_path, monkeypatch):
    loaded = Curvature.load(fitted.save(tmp_path / "c", per_map=True))
    alive, most = [], [0]
    real = StoredFactors.__getitem__

    def tracked(self, name):
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
        basis = real(self, name)
        alive.append(weakref.ref(basis))
        return basis

    monkeypatch.setattr(StoredFactors, "__getitem__", tracked)
    loaded.precondition(_grads(fitted))
    assert len(alive) == len(fitted.shapes) and most[0] == 1


def test_per_map_round_trip_of_kfac_and_unrolled_and_copies_stream(tl_adapter, tokenized, fitted, tmp_path):
    kfac = fit_curvature(tl_adapter, tokenized[:6], strategy="kfac", progress=False)
    unrolled = UnrolledCurvature.from_curvature(fitted, Horizon((0.01,) * 20))
    for name, c in (("kfac", kfac), ("unrolled", unrolled)):
        loaded = Curvature.load(c.save(tmp_path / name, per_map=True))
        assert type(loaded) is type(c) and loaded.streams
        grads = _grads(c)
        for n, v in loaded.precondition(grads).items():
            assert_close_in_norm(v, c.precondition(grads)[n], 1e-6)
    streamed = Curvature.load(fitted.save(tmp_path / "c", per_map=True))
    streamed.save(tmp_path / "copy")  # a streamed curvature is copied per map, one map at a time
    assert json.loads((tmp_path / "copy" / "curvature.json").read_text())["storage"] == "maps"
    streamed.save(tmp_path / "c")  # saved where it is read from: only the JSON is written again
    single = Curvature.load(streamed.save(tmp_path / "single", per_map=False))
    assert not single.streams and (tmp_path / "single" / "curvature.safetensors").is_file()
    grads = _grads(fitted)
    for c in (Curvature.load(tmp_path / "copy"), Curvature.load(tmp_path / "c"), single):
        for n, v in c.precondition(grads).items():
            torch.testing.assert_close(v, fitted.precondition(grads)[n], rtol=0, atol=0)


def test_single_file_folders_still_load(fitted, tmp_path):
    fitted.save(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "curvature.json").read_text())
    assert config["format_version"] == 1 and "storage" not in config
    loaded = Curvature.load(tmp_path / "c")
    assert not loaded.streams and loaded.dampings == fitted.dampings


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled",))


def _broken(fitted, tmp_path, how: str):
    folder = fitted.save(tmp_path / how, per_map=True)
    config = json.loads((folder / "curvature.json").read_text())
    first = folder / config["maps"][0]["file"]
    if how == "missing":
        first.unlink()
    elif how == "pickle":
        first.write_bytes(pickle.dumps(_Exploit()))
    elif how == "shape":
        tensors = load_tensors(first)
        tensors["q_a"] = tensors["q_a"][:-1]
        save_tensors(first, tensors)
    elif how == "outside":
        config["maps"][0]["file"] = "../elsewhere.safetensors"
    elif how == "no storage":
        del config["storage"]
    (folder / "curvature.json").write_text(json.dumps(config))
    return folder, first


@pytest.mark.parametrize("how, named, message", [
    ("missing", "map", "no such file"), ("pickle", "map", "pickles are refused"),
    ("shape", "map", "tensor q_a of map 'blocks.0.attn.W_Q' is shape"),
    ("outside", "json", "a file in maps/"), ("no storage", "json", "storage None at format version 2"),
])
def test_bad_map_files_are_errors_naming_the_file(fitted, tmp_path, capsys, how, named, message):
    folder, first = _broken(fitted, tmp_path, how)
    with pytest.raises(CurvatureError) as e:
        Curvature.load(folder).precondition(_grads(fitted))
    assert str(first if named == "map" else folder / "curvature.json") in str(e.value) and message in str(e.value)
    assert "unpickled" not in capsys.readouterr().out


def test_covariance_dtype(tl_adapter, tokenized, fitted):
    grads = _grads(fitted)
    want = fitted.precondition(grads)
    wide = fit_curvature(tl_adapter, tokenized[:6], strategy="ekfac", batch_size=3, progress=False,
                         covariance_dtype="float64")
    narrow = fit_curvature(tl_adapter, tokenized[:6], strategy="ekfac", batch_size=3, progress=False,
                           covariance_dtype="bfloat16")
    name = next(iter(fitted.shapes))
    assert wide.factors[name].q_a.dtype == torch.float64 and narrow.factors[name].q_a.dtype == torch.float32
    for n in grads:
        assert_close_in_norm(wide.precondition(grads)[n], want[n], 1e-4)
    # bfloat16 sums keep 8 bits: the covariances to about 1e-2; preconditioned gradients move by ~10 % at the default
    # damping on this tiny model (eigenvectors of near-equal eigenvalues rotate), ~1e-2 at damping x100
    sums = [collect_covariance_stats(tl_adapter, tokenized[:6], batch_size=3, progress=False, covariance_dtype=d)
            for d in ("float32", "bfloat16")]
    assert sums[1].sums[f"{name}/a"].dtype == torch.bfloat16
    for key, value in sums[0].sums.items():
        assert_close_in_norm(sums[1].sums[key], value, 2e-2)
    damped = fitted.with_damping(damping_factor=10.0).precondition(grads)
    for n, v in narrow.with_damping(damping_factor=10.0).precondition(grads).items():
        assert_close_in_norm(v, damped[n], 3e-2)
    with pytest.raises(ValueError, match="covariance_dtype"):
        CurvatureSettings(covariance_dtype="float16")
