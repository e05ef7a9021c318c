"""Model folders: save_model / load_model round trips, and unreadable folders refused with a clear error."""

import pytest
import torch

from concept_influence.data import collate
from concept_influence.models import ModelLoadError, load_model, save_model


def test_round_trip_keeps_weights_and_outputs(any_adapter, tokenized, tmp_path):
    save_model(any_adapter, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(any_adapter)
    assert loaded.fingerprint() == any_adapter.fingerprint()
    batch = collate(tokenized[:4], any_adapter.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded.per_example_loss(batch), any_adapter.per_example_loss(batch), rtol=0, atol=0)
    assert len(loaded.tokenizer) == len(any_adapter.tokenizer)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tl_adapter, tmp_path):
    save_model(tl_adapter, tmp_path / "m")
    (tmp_path / "m" / "tl_config.json").unlink()
    with pytest.raises(ModelLoadError, match="neither tl_config.json"):
        load_model(tmp_path / "m")


def test_pickled_weights_refused(tl_adapter, tmp_path):
    save_model(tl_adapter, tmp_path / "m")
    torch.save(tl_adapter.model.state_dict(), tmp_path / "m" / "model.safetensors")  # a pickle under the right name
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_model(tmp_path / "m")


def test_hf_bin_weights_refused(hf_adapter, tmp_path):
    save_model(hf_adapter, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    torch.save({}, tmp_path / "m" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*pickled weights are refused"):
        load_model(tmp_path / "m")


def test_weights_that_do_not_fit(tl_adapter, tmp_path):
    save_model(tl_adapter, tmp_path / "m")
    cfg = (tmp_path / "m" / "tl_config.json").read_text().replace('"d_mlp": 128', '"d_mlp": 64')
    (tmp_path / "m" / "tl_config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="do not fit the config"):
        load_model(tmp_path / "m")
