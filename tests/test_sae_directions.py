"""SAE latents as concept directions (SAE-Lens 6.x): loading from disk, decoder/encoder directions,
compatibility checks."""

import pytest
import torch

from concept_influence.concepts import check_direction_compatible
from concept_influence.models import HookError
from concept_influence.sae_concepts import check_sae_compatible
from probes import (
    ConceptDirection,
    DirectionError,
    SAEError,
    load_pretrained_sae,
    load_sae,
    sae_direction,
)

HOOK = "blocks.1.hook_resid_post"


def _make_sae(d_in=32, d_sae=64, hook=HOOK):
    from sae_lens import SAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=d_in, d_sae=d_sae).to_dict())
    with torch.no_grad():  # distinct, non-trivial weights so that rows and columns cannot be confused
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
        sae.W_dec.copy_(torch.randn_like(sae.W_dec))
    if hook is not None:
        sae.cfg.metadata.hook_name = hook
    return sae


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory):
    path = tmp_path_factory.mktemp("sae") / "standard"
    sae = _make_sae()
    sae.save_model(path)
    return path, sae


def test_load_sae_round_trip(saved_sae):
    path, original = saved_sae
    sae = load_sae(path)
    assert torch.equal(sae.W_dec, original.W_dec) and torch.equal(sae.W_enc, original.W_enc)
    assert sae.cfg.metadata.hook_name == HOOK
    assert sae.cfg.metadata.loaded_from == str(path)


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_sae_direction(saved_sae, which):
    path, original = saved_sae
    sae = load_sae(path)
    d = sae_direction(sae, 5, which)
    expected = original.W_dec[5] if which == "decoder" else original.W_enc[:, 5]
    assert isinstance(d, ConceptDirection) and d.kind == f"sae_{which}"
    assert torch.equal(d.vector, expected.detach())
    assert (d.hook_name, d.layer) == (HOOK, 1)
    assert d.metadata["latent"] == 5 and d.metadata["d_sae"] == 64 and d.metadata["source"] == str(path)
    assert d.metadata["architecture"] == "standard" and d.metadata["sae_hook_name"] == HOOK
    assert not d.vector.requires_grad


def test_sae_direction_saves_and_hook_override(tmp_path):
    sae = _make_sae(hook=None)
    with pytest.raises(SAEError, match="no hook name"):
        sae_direction(sae, 0)
    d = sae_direction(sae, 3, hook_name="blocks.0.hook_resid_pre")
    assert d.hook_name == "blocks.0.hook_resid_pre" and d.layer == 0 and d.metadata["sae_hook_name"] is None
    back = ConceptDirection.load(d.save(tmp_path / "latent3.safetensors"))
    assert torch.equal(back.vector, sae.W_dec[3].detach()) and back.metadata == d.metadata


def test_latent_out_of_range_and_bad_which():
    sae = _make_sae()
    for latent in (64, -1):
        with pytest.raises(SAEError, match=r"latent .* out of range.*0\.\.63"):
            sae_direction(sae, latent)
    with pytest.raises(ValueError, match="which must be"):
        sae_direction(sae, 0, "bias")


def test_load_sae_missing_files(tmp_path, saved_sae):
    with pytest.raises(SAEError, match="no such SAE folder"):
        load_sae(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SAEError, match="missing cfg.json and sae_weights.safetensors"):
        load_sae(empty)
    only_weights = tmp_path / "weights_only"
    only_weights.mkdir()
    (only_weights / "sae_weights.safetensors").write_bytes((saved_sae[0] / "sae_weights.safetensors").read_bytes())
    with pytest.raises(SAEError, match="missing cfg.json$"):
        load_sae(only_weights)


def test_check_sae_compatible(tl_adapter):
    check_sae_compatible(_make_sae(), tl_adapter)
    with pytest.raises(SAEError, match="SAE d_in is 48 but the model's activations at 'blocks.1.hook_resid_post' have width 32"):
        check_sae_compatible(_make_sae(d_in=48), tl_adapter)
    with pytest.raises(HookError, match="close matches: blocks.1.hook_resid_post"):
        check_sae_compatible(_make_sae(hook="blocks.1.hook_resid_pst"), tl_adapter)
    with pytest.raises(HookError, match="out of range"):
        check_sae_compatible(_make_sae(hook="blocks.4.hook_resid_post"), tl_adapter)
    with pytest.raises(SAEError, match="no hook name"):
        check_sae_compatible(_make_sae(hook=None), tl_adapter)
    check_sae_compatible(_make_sae(hook=None), tl_adapter, hook_name="blocks.0.hook_resid_post")
    # a direction from a mismatched SAE is caught by the direction's own check as well
    with pytest.raises(DirectionError, match="size 48"):
        check_direction_compatible(sae_direction(_make_sae(d_in=48), 0), tl_adapter)


def test_load_pretrained_sae_errors(monkeypatch, tmp_path):
    """No hub here: the call is wired to SAE.from_pretrained and fails with a clear SAEError, for an
    unknown release and for a known release that is neither reachable nor cached."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SAEError, match="release 'not-a-release'.*not found"):
        load_pretrained_sae("not-a-release", "blocks.0.hook_resid_pre")
    with pytest.raises(SAEError, match="no access to the Hugging Face Hub and not in the local cache"):
        load_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
