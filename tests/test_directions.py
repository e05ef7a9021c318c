"""ConceptDirection: validation, compatibility with a model, safetensors round trip, persona-vector import."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from concept_influence.concepts import check_direction_compatible
from concept_influence.models import HookError
from probes import ConceptDirection, DirectionError, load_persona_vector


def _direction(d=32, hook="blocks.1.hook_resid_post", **kw):
    return ConceptDirection(torch.linspace(-1, 2, d), hook, **kw)


def test_fields_layer_unit_and_dtype():
    v = torch.arange(1, 5, dtype=torch.float64)
    d = ConceptDirection(v, "blocks.3.hook_resid_pre", kind="diff_means")
    assert d.layer == 3 and d.kind == "diff_means" and d.metadata == {}
    assert d.vector.dtype == torch.float32 and d.vector.shape == (4,)
    assert torch.allclose(d.unit, v.float() / v.norm().float())
    assert torch.isclose(d.unit.norm(), torch.tensor(1.0))
    v[0] = 100.0  # the direction holds its own copy
    assert d.vector[0] == 1.0


@pytest.mark.parametrize(
    "vector, match",
    [
        (torch.zeros(8), "zero direction"),
        (torch.tensor([1.0, float("nan"), 0.0]), "non-finite"),
        (torch.tensor([1.0, float("inf")]), "non-finite"),
        (torch.ones(2, 4), "1-D"),
    ],
)
def test_invalid_vectors(vector, match):
    with pytest.raises(DirectionError, match=match):
        ConceptDirection(vector, "blocks.0.hook_resid_post")


def test_layer_and_kind_validation():
    assert ConceptDirection(torch.ones(3), "hook_embed", layer=-1).layer == -1
    with pytest.raises(DirectionError, match="cannot infer the layer"):
        ConceptDirection(torch.ones(3), "hook_embed")
    with pytest.raises(DirectionError, match="contradicts"):
        ConceptDirection(torch.ones(3), "blocks.1.hook_resid_post", layer=0)
    with pytest.raises(DirectionError, match="unknown direction kind"):
        ConceptDirection(torch.ones(3), "blocks.1.hook_resid_post", kind="pca")


def test_check_direction_compatible(tl_adapter):
    check_direction_compatible(_direction(), tl_adapter)
    with pytest.raises(DirectionError, match=r"blocks\.1\.hook_resid_post.*size 16.*activations there have width 32"):
        check_direction_compatible(_direction(d=16), tl_adapter)
    with pytest.raises(HookError, match="close matches: blocks.1.hook_resid_post"):
        check_direction_compatible(_direction(hook="blocks.1.hook_resid_pots"), tl_adapter)
    with pytest.raises(HookError, match=r"layer 5 .* out of range.*0\.\.1"):
        check_direction_compatible(_direction(hook="blocks.5.hook_resid_post"), tl_adapter)
    with pytest.raises(DirectionError, match=r"layer 7 is out of range"):
        check_direction_compatible(ConceptDirection(torch.ones(32), "ln_final.hook_normalized", layer=7), tl_adapter)


def test_save_load_round_trip(tmp_path):
    meta = {"metrics": {"roc_auc": 0.93, "C": 0.1}, "n": 40, "source": "probe.jsonl"}
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    d = ConceptDirection(v, "blocks.1.hook_resid_post", kind="logistic", metadata=meta)
    path = d.save(tmp_path / "sub" / "concept.safetensors")
    assert path.is_file() and (tmp_path / "sub" / "concept.json").is_file()
    # nothing else is left behind (the temporary files were renamed)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["concept.json", "concept.safetensors"]
    sidecar = json.loads((tmp_path / "sub" / "concept.json").read_text())
    assert sidecar["format_version"] == 1 and sidecar["hook_name"] == "blocks.1.hook_resid_post"
    back = ConceptDirection.load(path)
    assert torch.equal(back.vector, d.vector)
    assert (back.hook_name, back.layer, back.kind, back.metadata) == (d.hook_name, 1, "logistic", meta)


def test_save_refuses_bad_metadata_and_json_name(tmp_path):
    with pytest.raises(DirectionError, match="JSON"):
        _direction(metadata={"x": object()}).save(tmp_path / "d.safetensors")
    with pytest.raises(DirectionError, match="JSON"):
        _direction(metadata={"x": float("nan")}).save(tmp_path / "d.safetensors")
    with pytest.raises(DirectionError, match=".safetensors"):
        _direction().save(tmp_path / "d.json")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_pickle_and_missing_files(tmp_path):
    pickled = tmp_path / "evil.safetensors"
    torch.save({"vector": torch.ones(4)}, pickled)
    with pytest.raises(DirectionError, match=r"evil\.safetensors: not a readable safetensors file.*never loaded"):
        ConceptDirection.load(pickled)
    with pytest.raises(DirectionError, match="missing.safetensors: no such file"):
        ConceptDirection.load(tmp_path / "missing.safetensors")
    lone = tmp_path / "lone.safetensors"
    save_file({"vector": torch.ones(4)}, lone)
    with pytest.raises(DirectionError, match="sidecar lone.json .* missing"):
        ConceptDirection.load(lone)
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.ones(4)}, other)
    with pytest.raises(DirectionError, match="no tensor named 'vector'"):
        ConceptDirection.load(other)


def test_load_refuses_unknown_format_version(tmp_path):
    path = _direction().save(tmp_path / "d.safetensors")
    sidecar = tmp_path / "d.json"
    header = json.loads(sidecar.read_text())
    header["format_version"] = 99
    sidecar.write_text(json.dumps(header))
    with pytest.raises(DirectionError, match="format version 99"):
        ConceptDirection.load(path)


@pytest.fixture
def persona_file(tmp_path):
    """A persona-vector file like safety-research/persona_vectors writes: [n_layers+1, d_model], torch.save."""
    t = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(t, path)
    return path, t


def test_persona_vector_row_to_hook(persona_file, tl_adapter):
    path, t = persona_file
    emb = load_persona_vector(path, 0)
    assert (emb.hook_name, emb.layer, emb.kind) == ("blocks.0.hook_resid_pre", 0, "persona_vector")
    assert torch.equal(emb.vector, t[0].float())
    for row in (1, 2):
        d = load_persona_vector(path, row)
        assert (d.hook_name, d.layer) == (f"blocks.{row - 1}.hook_resid_post", row - 1)
        assert torch.equal(d.vector, t[row].float())
        assert d.metadata["hidden_states_index"] == row and d.metadata["source"] == str(path)
        check_direction_compatible(d, tl_adapter)
    hf = load_persona_vector(path, 2, hook_template="blocks.{block}.hook_resid_pre")
    assert hf.hook_name == "blocks.1.hook_resid_pre"


def test_persona_vector_safetensors(tmp_path):
    t = torch.randn(3, 8)
    save_file({"persona": t}, tmp_path / "pv.safetensors")
    d = load_persona_vector(tmp_path / "pv.safetensors", 2)
    assert torch.equal(d.vector, t[2]) and d.metadata["tensor_key"] == "persona"


def test_persona_vector_errors(persona_file, tmp_path):
    path, _ = persona_file
    with pytest.raises(DirectionError, match=r"layer 3 is out of range .* valid rows are 0\.\.2"):
        load_persona_vector(path, 3)
    with pytest.raises(DirectionError, match=r"valid rows are 0\.\.2"):
        load_persona_vector(path, -1)
    flat = tmp_path / "flat.pt"
    torch.save(torch.ones(32), flat)
    with pytest.raises(DirectionError, match=r"\[n_layers\+1, d_model\] tensor, got shape \(32,\)"):
        load_persona_vector(flat, 0)
    not_tensor = tmp_path / "dict.pt"
    torch.save({"a": torch.ones(2, 2)}, not_tensor)
    with pytest.raises(DirectionError, match="found a dict"):
        load_persona_vector(not_tensor, 0)
    code = tmp_path / "code.pt"
    torch.save(np.arange(3), code)  # a numpy array is not allowed by weights_only loading
    with pytest.raises(DirectionError, match="weights_only"):
        load_persona_vector(code, 0)
    zero = tmp_path / "zero.pt"
    torch.save(torch.zeros(2, 4), zero)
    with pytest.raises(DirectionError, match="zero.pt, row 1: zero direction"):
        load_persona_vector(zero, 1)
    with pytest.raises(DirectionError, match="no such persona-vector file"):
        load_persona_vector(tmp_path / "nope.pt", 0)


def test_sidecars_written_before_the_layer_split_are_read(tmp_path):
    """Directions saved when the format tag carried the upper package's name still load."""
    path = ConceptDirection(torch.ones(4), "blocks.0.hook_resid_post").save(tmp_path / "d.safetensors")
    sidecar = path.with_suffix(".json")
    header = json.loads(sidecar.read_text())
    assert header["format"] == "probes.ConceptDirection"
    header["format"] = "concept_influence.ConceptDirection"  # the tag files of the earlier layout carry
    sidecar.write_text(json.dumps(header))
    assert torch.equal(ConceptDirection.load(path).vector, torch.ones(4))
    header["format"] = "something.else"
    sidecar.write_text(json.dumps(header))
    with pytest.raises(DirectionError, match="not a concept-direction sidecar"):
        ConceptDirection.load(path)
