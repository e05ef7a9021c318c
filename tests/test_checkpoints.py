"""Scores summed over training checkpoints (OverCheckpoints), checkpoint loading and Scores.weighted_sum."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from norms import assert_close_in_norm
from test_estimators import explicit_concept_influence

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import CurvatureSettings, fit_curvature
from concept_influence.estimators import ConceptGradDot, ConceptInfluence, OverCheckpoints
from concept_influence.fileio import save_tensors
from concept_influence.models import ModelLoadError, as_adapter, load_checkpoint, save_model
from concept_influence.planted.curvature_study import run_curvature_study, variant_name
from concept_influence.scores import Scores
from conftest import _hf_model
from probes import ConceptDirection

HOOK = "blocks.1.hook_resid_post"


def _concept(adapter, tokenized) -> ConceptFunction:
    torch.manual_seed(0)
    direction = ConceptDirection(torch.randn(adapter.d_model), HOOK, kind="custom")
    return ConceptFunction.from_directions(direction, eval_examples=tokenized[:3])


def _moved(adapter, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights with a seeded random step (a stand-in for another checkpoint of its training)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) * v.std() for k, v in adapter.model.state_dict().items()
            if v.is_floating_point() and v.ndim == 2}


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_sum_over_checkpoints_equals_explicit_autograd_at_each(tl_adapter, tokenized, strategy):
    """Σ_c w_c·CI_c(z), each term from per-example autograd gradients at checkpoint c with its own curvature."""
    concept, maps = _concept(tl_adapter, tokenized), tl_adapter.linear_maps()
    before = tl_adapter.fingerprint()
    checkpoints, weights = [_moved(tl_adapter, 0.3, 1), None, _moved(tl_adapter, 0.1, 2)], [0.5, 1.0, 2.0]
    scores = OverCheckpoints(lambda: ConceptInfluence(concept, strategy, fit_examples=tokenized,
                                                                     fit=CurvatureSettings(batch_size=4)),
                             checkpoints, weights=weights).score(tl_adapter, tokenized, batch_size=5, progress=False)
    assert tl_adapter.fingerprint() == before  # the model's own weights are back
    own = {k: v.clone() for k, v in tl_adapter.model.state_dict().items()}
    ref = np.zeros(len(tokenized))
    for checkpoint, w in zip(checkpoints, weights):
        tl_adapter.model.load_state_dict({**own, **(checkpoint or {})})
        curvature = fit_curvature(tl_adapter, tokenized, maps=maps, strategy=strategy, batch_size=4, progress=False)
        ref += w * explicit_concept_influence(tl_adapter, concept, tokenized, curvature, maps)
    tl_adapter.model.load_state_dict(own)
    assert scores.estimator == "concept_influence[checkpoints]"
    assert scores.metadata["checkpoint_weights"] == weights and len(scores.metadata["checkpoints"]) == 3
    np.testing.assert_allclose(scores.column(0), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_checkpoints_from_files_and_folders_equal_in_memory(tl_adapter, tokenized, tmp_path):
    concept = _concept(tl_adapter, tokenized)
    moved = _moved(tl_adapter, 0.3, 1)
    save_tensors(tmp_path / "partial.safetensors", moved)  # only the weight matrices: the rest keeps its values
    own = {k: v.clone() for k, v in tl_adapter.model.state_dict().items()}
    tl_adapter.model.load_state_dict({**own, **moved})
    save_model(tl_adapter, tmp_path / "folder")
    tl_adapter.model.load_state_dict(own)
    make = lambda: ConceptGradDot(concept)  # noqa: E731
    expected = OverCheckpoints(make, [moved]).score(tl_adapter, tokenized, progress=False).values
    for source in (tmp_path / "partial.safetensors", tmp_path / "folder"):
        got = OverCheckpoints(make, [source]).score(tl_adapter, tokenized, progress=False)
        np.testing.assert_allclose(got.values, expected, rtol=1e-6)
        assert got.metadata["checkpoints"] == [str(source)]


def test_peft_adapter_checkpoint_folder(tokenizer, tokenized, tmp_path):
    peft = pytest.importorskip("peft")
    from test_peft import lora_model  # (imports peft)

    adapter = as_adapter(lora_model(_hf_model("llama", len(tokenizer)), seed=0), tokenizer)
    other = lora_model(_hf_model("llama", len(tokenizer)), seed=1)
    other.save_pretrained(tmp_path / "checkpoint-10")
    before = adapter.fingerprint()
    load_checkpoint(adapter, tmp_path / "checkpoint-10")
    assert adapter.fingerprint() == as_adapter(other, tokenizer).fingerprint()
    adapter2 = as_adapter(lora_model(_hf_model("llama", len(tokenizer)), seed=0), tokenizer)
    assert adapter2.fingerprint() == before
    concept = _concept(adapter2, tokenized)
    summed = OverCheckpoints(lambda: ConceptGradDot(concept), [tmp_path / "checkpoint-10", None]).score(
        adapter2, tokenized, progress=False)
    assert adapter2.fingerprint() == before
    at_own = ConceptGradDot(concept).score(adapter2, tokenized, progress=False)
    at_other = ConceptGradDot(concept).score(as_adapter(other, tokenizer), tokenized, progress=False)
    np.testing.assert_allclose(summed.values, at_own.values + at_other.values, rtol=1e-5, atol=1e-9)
    assert isinstance(adapter2.model, peft.PeftModel)
    base_key, base_weight = next((k, v) for k, v in adapter2.model.state_dict().items() if "lora_" not in k)
    with pytest.raises(ValueError, match=f"adapter weights only \\(lora_\\*\\), got '{re.escape(base_key)}'"):
        OverCheckpoints(lambda: ConceptGradDot(concept), [{base_key: base_weight}]).score(adapter2, tokenized,
                                                                                      progress=False)


def test_checkpoint_errors(tl_adapter, tokenizer, tmp_path):
    before = tl_adapter.fingerprint()
    with pytest.raises(ModelLoadError, match=r"weights the model does not have, e.g. 'nope'"):
        load_checkpoint(tl_adapter, {"nope": torch.zeros(1)})
    name, w = next(iter(tl_adapter.model.state_dict().items()))
    shape = re.escape(str(tuple(w.shape)))
    with pytest.raises(ModelLoadError, match=rf"weight '{name}' has shape \(1,\), the model.s is {shape}"):
        load_checkpoint(tl_adapter, {name: torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_checkpoint(tl_adapter, tmp_path)
    (tmp_path / "pickled.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ModelLoadError, match="pickled.safetensors: not a readable safetensors file"):
        load_checkpoint(tl_adapter, tmp_path / "pickled.safetensors")
    (tmp_path / "lora").mkdir()
    save_tensors(tmp_path / "lora" / "adapter_model.safetensors", {"x.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelLoadError, match="a PEFT adapter checkpoint, but the model is not a PEFT model"):
        load_checkpoint(as_adapter(_hf_model("llama", len(tokenizer)), tokenizer), tmp_path / "lora")
    assert tl_adapter.fingerprint() == before  # nothing was loaded
    with pytest.raises(ValueError, match="at least one checkpoint"):
        OverCheckpoints(lambda: None, [])
    with pytest.raises(ValueError, match="2 weights for 1 checkpoints"):
        OverCheckpoints(lambda: None, [None], weights=[1, 2])


def test_a_failing_checkpoint_restores_the_model(tl_adapter, tokenized):
    concept = _concept(tl_adapter, tokenized)
    before = tl_adapter.fingerprint()
    with pytest.raises(ModelLoadError):
        OverCheckpoints(lambda: ConceptGradDot(concept), [_moved(tl_adapter, 0.3, 1), {"nope": torch.zeros(1)}]).score(
            tl_adapter, tokenized, progress=False)
    assert tl_adapter.fingerprint() == before


def test_weighted_sum_of_scores():
    a = Scores(["x", "y"], np.array([[1.0, 2.0], [3.0, 4.0]]), "e", ["p", "q"],
               per_module={"m": np.ones((2, 2))})
    b = Scores(["x", "y"], np.array([[10.0, 20.0], [30.0, 40.0]]), "e", ["p", "q"],
               per_module={"m": np.full((2, 2), 2.0)})
    total = Scores.weighted_sum([a, b], [2.0, 0.5], estimator="sum")
    np.testing.assert_allclose(total.values, [[7.0, 14.0], [21.0, 28.0]])
    np.testing.assert_allclose(total.per_module["m"], np.full((2, 2), 3.0))
    assert total.estimator == "sum" and total.per_token is None
    with pytest.raises(ValueError, match=r"scores 2 have columns \['p'\], scores 1 have \['p', 'q'\]"):
        Scores.weighted_sum([a, Scores(["x", "y"], np.zeros((2, 1)), "e", ["p"])])
    with pytest.raises(ValueError, match="scores 2 and scores 1 differ in their ids \\(from row 1"):
        Scores.weighted_sum([a, Scores(["x", "z"], np.zeros((2, 2)), "e", ["p", "q"])])
    with pytest.raises(ValueError, match="1 weights for 2"):
        Scores.weighted_sum([a, b], [1.0])


def test_sum_scores_command(tmp_path, capsys):
    from concept_influence.cli import main

    a = Scores(["x", "y"], np.array([1.0, 2.0]), "concept_influence", metadata={"concept": "c"})
    b = Scores(["x", "y"], np.array([10.0, 20.0]), "concept_influence")
    a.save(tmp_path / "base.safetensors")
    b.save(tmp_path / "final.safetensors")
    out = tmp_path / "sum.safetensors"
    assert main(["sum-scores", str(out), str(tmp_path / "base.safetensors"), str(tmp_path / "final.safetensors"),
                 "--weights", "2", "1"]) == 0
    total = Scores.load(out)
    np.testing.assert_allclose(total.column(0), [12.0, 24.0])
    assert total.estimator == "concept_influence[checkpoints]" and total.metadata["weights"] == [2.0, 1.0]
    assert main(["sum-scores", str(out), str(tmp_path / "base.safetensors")]) == 2  # exists: nothing replaced
    assert "exists; give --force" in capsys.readouterr().err
    np.testing.assert_allclose(Scores.load(out).column(0), [12.0, 24.0])
    Scores(["x", "z"], np.array([1.0, 2.0]), "e").save(tmp_path / "other.safetensors")
    assert main(["sum-scores", str(tmp_path / "o.safetensors"), str(tmp_path / "base.safetensors"),
                 str(tmp_path / "other.safetensors")]) == 2
    assert "differ in their ids (from row 1" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main(["sum-scores", str(tmp_path / "o.safetensors"), str(tmp_path / "bad.safetensors")]) == 2
    assert "bad.safetensors: cannot read scores" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_adapter_at_its_initialisation_scores_through_lora_b(tokenizer, tokenized):
    """At a fresh LoRA adapter (B = 0) lora_A has no gradient and zero curvature: its share is 0 instead of an error
    about its relative damping, and lora_B carries the score (what summing from the base model needs)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = as_adapter(peft.get_peft_model(_hf_model("llama", len(tokenizer)), config).eval(), tokenizer)
    scores = ConceptInfluence(_concept(adapter, tokenized), "ekfac", fit_examples=tokenized, per_module=True).score(
        adapter, tokenized, batch_size=4, progress=False)
    shares = {name: np.abs(v).max() for name, v in scores.per_module.items()}
    assert all(v == 0 for name, v in shares.items() if "lora_A" in name)
    assert all(v > 0 for name, v in shares.items() if "lora_B" in name) and np.isfinite(scores.values).all()


def test_curvature_study_columns_are_the_named_estimators(tl_adapter, tokenized):
    """Each column of the study's one scoring pass per checkpoint equals the estimator it stands for: identity is
    concept_grad_dot, a damping factor rescales EK-FAC's damping, and ``sum`` is OverCheckpoints over (base, final)."""
    direction = ConceptDirection(torch.randn(tl_adapter.d_model, generator=torch.Generator().manual_seed(0)), HOOK,
                                 kind="custom")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:3])
    base = _moved(tl_adapter, 0.3, seed=1)
    study, scores = run_curvature_study(tl_adapter, direction, tokenized[:3], tokenized, [1, 0] * 6, {"pool": tokenized}, base,
                                        damping_factors=(0.1, 10.0), batch_size=4, progress=False)
    assert len(study["variants"]) == 3 * 2 and {v["checkpoint"] for v in study["variants"]} == {"final", "sum"}

    def named(make, over_checkpoints: bool) -> np.ndarray:
        estimator = OverCheckpoints(make, [base, None]) if over_checkpoints else make()
        return estimator.score(tl_adapter, tokenized, batch_size=4, progress=False).column(0)

    for checkpoint in ("final", "sum"):
        summed = checkpoint == "sum"
        np.testing.assert_allclose(scores[variant_name("last_prompt", "-", "identity", checkpoint)],
                                   named(lambda: ConceptGradDot(concept), summed), rtol=1e-4, atol=1e-6)
        for factor in (0.1, 10.0):
            expected = named(lambda: ConceptInfluence(concept, "ekfac", fit_examples=tokenized,
                                                      fit=CurvatureSettings(batch_size=4, seed=0, damping_factor=factor)),
                             summed)
            got = scores[variant_name("last_prompt", "pool", f"ekfac@{factor:g}", checkpoint)]
            assert_close_in_norm(got, expected, 1e-5, msg=f"{checkpoint}, ekfac@{factor:g}")  # two fits: ~2e-7 here
