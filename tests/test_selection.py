"""What to track: MapSelection (module kinds, name globs, block ranges) through the adapters, resolve_maps, the run
config's [model] track, and a run folder."""

from __future__ import annotations

import json

import pytest
import torch

from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import fit_curvature, resolve_maps
from concept_influence.models import HFCausalLMAdapter, MapSelection, MapSelectionError, map_kind
from concept_influence.models.hugging_face import parse_track
from concept_influence.models.selection import parse_blocks
from concept_influence.toy.small_model import build_small_model
from conftest import _hf_model


def _tl(tokenizer, n_layers=3):
    return build_small_model(tokenizer, n_layers=n_layers, d_model=32, n_heads=4, n_ctx=64, seed=0)


def _hf(kind, tokenizer, layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return HFCausalLMAdapter(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=layers,
                                                            n_head=4, n_positions=64)).eval(), tokenizer)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return HFCausalLMAdapter(LlamaForCausalLM(cfg).eval(), tokenizer)


def test_parse_blocks_forms():
    assert parse_blocks("0-3") == (0, 1, 2, 3)
    assert parse_blocks("0-1, 5") == (0, 1, 5)
    assert parse_blocks(2) == (2,)
    assert parse_blocks([4, "0-1"]) == (0, 1, 4)
    for bad in ("3-1", "a", -1, [], [True], "1-"):
        with pytest.raises(MapSelectionError, match="blocks"):
            parse_blocks(bad)


def test_selection_round_trips_and_describes():
    s = MapSelection(kinds=["mlp"], names="*W_in", blocks="0-2,4")
    assert s.to_dict() == {"kinds": ["mlp"], "names": ["*W_in"], "blocks": "0-2,4"}
    assert MapSelection.parse(s.to_dict()) == s
    assert MapSelection.parse("attention") == MapSelection(kinds=("attention",))
    assert MapSelection.parse("*.q_proj") == MapSelection(names=("*.q_proj",))
    assert MapSelection.parse(None).is_everything
    with pytest.raises(MapSelectionError, match="unknown kind 'embed'"):
        MapSelection(kinds=("embed",))
    with pytest.raises(MapSelectionError, match="unknown key 'kind'"):
        MapSelection.parse({"kind": "mlp"})


def test_kinds_of_real_module_names(tokenizer):
    """Every map of each architecture has a kind, read from the real module names."""
    tl = _tl(tokenizer)
    kinds = {m.name.split(".")[-1]: m.kind for m in tl.linear_maps()}
    assert kinds == {"W_Q": "attention", "W_K": "attention", "W_V": "attention", "W_O": "attention",
                     "W_in": "mlp", "W_out": "mlp"}
    llama = {m.name.split(".", 2)[2]: m.kind for m in _hf("llama", tokenizer).linear_maps()}
    assert llama == {"self_attn.q_proj": "attention", "self_attn.k_proj": "attention", "self_attn.v_proj": "attention",
                     "self_attn.o_proj": "attention", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp",
                     "mlp.down_proj": "mlp"}
    gpt2 = {m.name.split(".", 2)[2]: m.kind for m in _hf("gpt2", tokenizer).linear_maps()}
    assert gpt2 == {"attn.c_attn": "attention", "attn.c_proj": "attention", "mlp.c_fc": "mlp", "mlp.c_proj": "mlp"}
    assert map_kind("blocks.0.ln_1") is None


@pytest.mark.parametrize("arch", ["tl", "llama", "gpt2"])
def test_kinds_names_and_blocks_select_maps(arch, tokenizer):
    adapter = _tl(tokenizer) if arch == "tl" else _hf(arch, tokenizer)
    every = adapter.linear_maps()
    mlp = adapter.linear_maps(select="mlp")
    attention = adapter.linear_maps(select=MapSelection(kinds=("attention",)))
    assert mlp and attention and len(mlp) + len(attention) == len(every)
    assert all(m.kind == "mlp" for m in mlp) and all(m.kind == "attention" for m in attention)
    late = adapter.linear_maps(select={"blocks": "1-2"})
    assert {m.block for m in late} == {1, 2} and len(late) == len(every) * 2 // 3
    assert [m.name for m in adapter.linear_maps(select={"blocks": [0, 2]})] == \
           [m.name for m in every if m.block in (0, 2)]
    glob = {"tl": "*.W_O", "llama": "*.o_proj", "gpt2": "*.attn.c_proj"}[arch]
    named = adapter.linear_maps(select={"names": [glob], "blocks": "0-1"})
    assert [m.block for m in named] == [0, 1]
    # combined with the concept's block limit: the intersection, checked against the whole model
    both = adapter.linear_maps(max_block=1, select={"kinds": ["mlp"], "blocks": "1-2"})
    assert both and all(m.block == 1 and m.kind == "mlp" for m in both)
    assert [m.name for m in resolve_maps(adapter, {"kinds": ["mlp"]})] == [m.name for m in mlp]
    assert [m.name for m in resolve_maps(adapter, "mlp")] == [m.name for m in mlp]


def test_empty_selections_name_what_matched_nothing(tokenizer):
    adapter = _hf("llama", tokenizer)
    with pytest.raises(MapSelectionError, match=r"names: the glob '\*\.q_prj' matches no linear map .*blocks\.0\."):
        adapter.linear_maps(select={"names": ["*.q_proj", "*.q_prj"]})
    with pytest.raises(MapSelectionError, match=r"blocks: blocks 3-7 have no linear map \(the model's blocks are 0\.\.2\)"):
        adapter.linear_maps(select={"blocks": "2-7"})
    with pytest.raises(MapSelectionError, match="no map passes all of them together"):
        adapter.linear_maps(select={"kinds": ["mlp"], "names": ["*.q_proj"]})
    with pytest.raises(MapSelectionError, match=r"keeps none of the 7 linear maps of blocks 0\.\.0"):
        adapter.linear_maps(max_block=0, select={"blocks": "2"})
    with pytest.raises(MapSelectionError, match="glob"):
        resolve_maps(adapter, "*.nothing")


def test_adapter_selection_is_the_default_and_fits_curvature_on_it(tokenizer, tokenized):
    adapter = _tl(tokenizer, n_layers=2)
    full = fit_curvature(adapter, tokenized[:4], strategy="kfac", progress=False)
    assert adapter.select({"kinds": ["mlp"], "blocks": "1"}) is adapter
    names = [m.name for m in adapter.linear_maps()]
    assert names == ["blocks.1.mlp.W_in", "blocks.1.mlp.W_out"]
    assert adapter.dtype == torch.float32  # read from the unselected maps
    part = fit_curvature(adapter, tokenized[:4], strategy="kfac", progress=False)
    assert sorted(part.shapes) == sorted(names)
    # a map's factors do not depend on which other maps are tracked
    x = torch.randn(1, *part.shapes[names[0]])
    torch.testing.assert_close(part.precondition({names[0]: x})[names[0]], full.precondition({names[0]: x})[names[0]])
    adapter.select(None)
    assert len(adapter.linear_maps()) == 12
    # an explicit select replaces the adapter's own selection
    assert [m.name for m in adapter.select("mlp").linear_maps(select={"names": "*.W_Q"})] == \
           ["blocks.0.attn.W_Q", "blocks.1.attn.W_Q"]
    with pytest.raises(MapSelectionError, match="block 5"):
        adapter.select({"blocks": 5})


def test_lora_factors_are_selected_by_kind_and_name(tokenizer):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = HFCausalLMAdapter(peft.get_peft_model(_hf_model("llama", len(tokenizer)), config).eval(), tokenizer)
    mlp = adapter.linear_maps(select="mlp")
    assert [m.name for m in mlp] == [f"blocks.{l}.mlp.down_proj.lora_{s}.default" for l in (0, 1) for s in "AB"]
    q = adapter.linear_maps(select={"names": ["*.q_proj.*"], "blocks": 1})
    assert [m.name for m in q] == ["blocks.1.self_attn.q_proj.lora_A.default", "blocks.1.self_attn.q_proj.lora_B.default"]


MODEL_KEYS = {"data": {"train": "t.jsonl"}, "probe": {"hook": "blocks.0.hook_resid_post", "direction": "d.safetensors"},
              "concept": {"eval": "e.jsonl"}}


def _config(track):
    return RunConfig.from_dict({"model": {"path": "m", "track": track}, **MODEL_KEYS})


def test_run_config_track_keeps_lora_words_and_takes_a_selection():
    for word in ("auto", "lora", "full"):
        cfg = _config(word).model
        assert parse_track(cfg.track)[0] == word and parse_track(cfg.track)[1].is_everything
    cfg = _config("mlp").model
    assert parse_track(cfg.track) == ("auto", MapSelection(kinds=("mlp",)))
    cfg = _config({"weights": "full", "kinds": ["attention"], "names": ["*.q_proj"], "blocks": "0-3"}).model
    assert parse_track(cfg.track)[0] == "full"
    assert parse_track(cfg.track)[1] == MapSelection(kinds=("attention",), names=("*.q_proj",), blocks=(0, 1, 2, 3))
    again = RunConfig.from_dict(json.loads(json.dumps(_config(cfg.track).to_dict())))
    assert parse_track(again.model.track) == parse_track(cfg.track)
    for bad, match in ((
            "attn", "track must be one of auto, lora, full, attention, mlp"),
            ({"weights": "half"}, "track.weights must be one of"),
            ({"kinds": ["mlp"], "block": "0"}, "unknown key 'block'"),
            ({"blocks": "3-1"}, "blocks: the range '3-1' is empty"),
            (3, "'model.track' must be")):
        with pytest.raises(ConfigError, match=match):
            _config(bad)


def test_a_run_folder_tracks_the_configured_maps_only(tmp_path):
    from runfolder import make_project

    from concept_influence.runs import RunError, run_config

    project = make_project(tmp_path / "p", n_train=24)
    toml = (project / "run.toml").read_text()
    (project / "mlp.toml").write_text(toml.replace('path = "model"', 'path = "model"\ntrack = "mlp"'))
    report = run_config(RunConfig.read(project / "mlp.toml"), project / "runs" / "mlp", progress=False)
    saved = json.loads((project / "runs" / "mlp" / "factors" / "curvature.json").read_text())
    assert [m["name"] for m in saved["maps"]] == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    assert report.is_file()
    scores = json.loads((project / "runs" / "mlp" / "scores" / "scores.json").read_text())
    assert scores["metadata"]["maps"] == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    (project / "bad.toml").write_text(toml.replace('path = "model"', 'path = "model"\n[model.track]\nblocks = "5"'))
    with pytest.raises(RunError, match=r"\[model\] track: blocks: block 5 has no linear map"):
        run_config(RunConfig.read(project / "bad.toml"), project / "runs" / "bad", progress=False)
