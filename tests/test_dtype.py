"""Models in bfloat16 / float16 on CPU: loading in a dtype, unsupported dtypes refused by name, EK-FAC Concept
Influence and the fast path of a low-precision model against the float32 model (tolerances and their reasons in
tests/lowprecision.py), with every factor, query and score accumulated in float32, and a run folder in bfloat16."""

import json

import numpy as np
import pytest
import torch
from lowprecision import (
    FAST_TOLERANCE,
    INFLUENCE_TOLERANCE,
    LOW_DTYPES,
    MIN_SPEARMAN,
    assert_accumulated_in_float32,
    assert_agrees,
    cast,
    random_concept,
    relative_error,
    score_both,
    spearman,
)
from runfolder import make_project

from concept_influence.concepts import ConceptFunction
from concept_influence.config import ConfigError, RunConfig
from concept_influence.curvature import collect_covariance_stats
from concept_influence.data import collate, tokenize_examples
from concept_influence.estimators import ConceptGradDot
from concept_influence.gradients import sample_labels
from concept_influence.models import HFCausalLMAdapter, ModelLoadError, load_model, save_model
from concept_influence.runs import run_config
from concept_influence.scores import Scores
from conftest import _hf_model, make_chats


def _fp16_matmul_on_cpu() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False


DTYPE_PARAMS = [
    "bfloat16",
    pytest.param("float16", marks=pytest.mark.skipif(not _fp16_matmul_on_cpu(),
                                                     reason=f"torch {torch.__version__} has no float16 matmul on CPU")),
]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_examples(make_chats(32, seed=3), tokenizer, max_length=64)


@pytest.mark.parametrize("dtype_name", DTYPE_PARAMS)
def test_low_precision_scores_agree_with_float32(any_adapter, examples, dtype_name):
    """The same tiny model in float32 and cast to bf16 / fp16: EK-FAC Concept Influence and probe_projection agree
    within the stated tolerances, and factors, queries and scores are float32."""
    low = cast(any_adapter, LOW_DTYPES[dtype_name])
    assert low.dtype == LOW_DTYPES[dtype_name] and low.fingerprint() != any_adapter.fingerprint()
    concept = random_concept(any_adapter.d_model, examples[:4])
    ref, got = score_both(any_adapter, concept, examples), score_both(low, concept, examples)
    assert_accumulated_in_float32(low, got)
    stats = collect_covariance_stats(low, examples[:8], maps=0, progress=False)
    assert {t.dtype for t in stats.sums.values()} == {torch.float32}
    measured = assert_agrees(got, ref, dtype_name)
    print(f"{type(any_adapter.model).__name__} {dtype_name}: {measured}")


def test_true_fisher_in_bfloat16_differs_only_by_sampled_labels(tl_adapter, examples):
    """With labels sampled from the model, a few labels drawn with the same uniforms differ between dtypes (the
    distributions differ in the third digit), so only the ranking is held to a bound (see tests/lowprecision.py)."""
    low = cast(tl_adapter, torch.bfloat16)
    batch = collate(examples, tl_adapter.pad_token_id)
    with torch.no_grad():
        labels = [sample_labels(a.logits(batch), batch, seed=0) for a in (tl_adapter, low)]
    mask = batch.response_mask[:, 1:]
    assert float((labels[0] == labels[1])[mask].float().mean()) >= 0.9
    concept = random_concept(tl_adapter.d_model, examples[:4])
    ref, got = (score_both(a, concept, examples, fisher="true") for a in (tl_adapter, low))
    assert_accumulated_in_float32(low, got)
    assert spearman(got["influence"], ref["influence"]) >= 0.95
    assert relative_error(got["fast"], ref["fast"]) <= FAST_TOLERANCE["bfloat16"]


def test_sae_latent_concept_in_bfloat16(tl_adapter, examples):
    """A float32 SAE read on a bf16 model's activations (sae.encode casts them): concept grad-dot scores agree."""
    from sae_lens import SAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=32, d_sae=16).to_dict())
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # keep the chosen latents active so the gradient is not zero
    concept = ConceptFunction.from_sae_latents(sae, [3, 7], eval_examples=examples[:4], hook_name="blocks.1.hook_resid_post")
    ref, got = (ConceptGradDot(concept).score(a, examples, progress=False).values
                for a in (tl_adapter, cast(tl_adapter, torch.bfloat16)))
    for k in range(2):
        assert relative_error(got[:, k], ref[:, k]) <= INFLUENCE_TOLERANCE["bfloat16"]
        assert spearman(got[:, k], ref[:, k]) >= MIN_SPEARMAN


def test_load_model_in_a_dtype(any_adapter, tokenized, tmp_path):
    """dtype= converts every tracked weight; "auto" / None keep the saved dtype; the fingerprint tells dtypes apart."""
    save_model(any_adapter, tmp_path / "fp32")
    kept = load_model(tmp_path / "fp32", dtype="auto")
    low = load_model(tmp_path / "fp32", dtype="bfloat16")
    assert kept.dtype == torch.float32 and kept.fingerprint() == any_adapter.fingerprint()
    assert {m.weight.dtype for m in low.linear_maps()} == {torch.bfloat16}
    assert low.fingerprint() != kept.fingerprint()
    batch = collate(tokenized[:4], any_adapter.pad_token_id)
    with torch.no_grad():
        loss, low_loss = any_adapter.per_example_loss(batch), low.per_example_loss(batch)
    assert low_loss.dtype == torch.float32  # the loss is taken in float32 from bf16 logits
    torch.testing.assert_close(low_loss, loss, rtol=2e-2, atol=0)
    save_model(low, tmp_path / "bf16")
    again = load_model(tmp_path / "bf16")
    assert again.dtype == torch.bfloat16 and again.fingerprint() == low.fingerprint()
    assert load_model(tmp_path / "bf16", dtype=torch.float32).dtype == torch.float32


def test_unsupported_dtypes_are_one_line_naming_the_accepted_ones(tl_adapter, tokenizer, tmp_path):
    save_model(tl_adapter, tmp_path / "m")
    accepted = "expected one of auto, float32, bfloat16, float16"
    with pytest.raises(ValueError, match=f"^unsupported model dtype 'bf16'; {accepted}$"):
        load_model(tmp_path / "m", dtype="bf16")  # no aliases: one spelling per dtype
    with pytest.raises(ValueError, match=f"^unsupported model dtype float64; {accepted}$"):
        load_model(tmp_path / "m", dtype=torch.float64)
    config = {"model": {"path": "m", "dtype": "float64"}, "data": {"train": "t.jsonl"},
              "probe": {"hook": "blocks.0.hook_resid_post", "direction": "d"}}
    with pytest.raises(ConfigError, match="^run.toml: 'model.dtype' must be one of auto, float32, bfloat16, float16; "
                                          "got 'float64'$"):
        RunConfig.from_dict(config, "run.toml")


def test_weights_in_an_unsupported_dtype_are_refused_by_name(tokenizer, tmp_path):
    """float64 weights (a saved folder: convert with dtype=) and int8 weights (no gradient flows through them)."""
    double = _hf_model("llama", len(tokenizer)).double()
    supported = "supported model dtypes: float32, bfloat16, float16"
    with pytest.raises(ValueError, match=f"^weight blocks.0.self_attn.q_proj is float64; {supported}"):
        HFCausalLMAdapter(double, tokenizer)
    double.save_pretrained(tmp_path / "m64")
    tokenizer.save_pretrained(tmp_path / "m64")
    with pytest.raises(ModelLoadError, match=f"^{tmp_path / 'm64'}: weight blocks.0.self_attn.q_proj is float64"):
        load_model(tmp_path / "m64")
    assert load_model(tmp_path / "m64", dtype="float32").dtype == torch.float32
    quantised = _hf_model("llama", len(tokenizer))
    mlp = quantised.model.layers[1].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=f"^weight blocks.1.mlp.up_proj is int8; {supported}"):
        HFCausalLMAdapter(quantised, tokenizer)


def test_run_folder_in_bfloat16(tmp_path):
    """``[model] dtype = "bfloat16"``: recorded in config.json, the bf16 fingerprint in run.json, and the scores
    (probe trained, EK-FAC fitted and scored on the bf16 model) agree with the float32 run's."""
    project = make_project(tmp_path, n_train=32)
    text = (project / "run.toml").read_text().replace("[factors]\n", '[factors]\nfisher = "empirical"\n')
    (project / "fp32.toml").write_text(text)
    (project / "bf16.toml").write_text(text.replace('path = "model"\n', 'path = "model"\ndtype = "bfloat16"\n'))
    scores = {}
    for name in ("fp32", "bf16"):
        run_config(RunConfig.read(project / f"{name}.toml"), project / "runs" / name, progress=False)
        scores[name] = Scores.load(project / "runs" / name / "scores" / "scores.safetensors")
    run = project / "runs" / "bf16"
    assert json.loads((run / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    recorded = json.loads((run / "run.json").read_text())["fingerprints"]["model"]
    assert recorded == load_model(project / "model", dtype="bfloat16").fingerprint()
    assert recorded != load_model(project / "model").fingerprint()
    assert scores["bf16"].ids == scores["fp32"].ids
    got, ref = scores["bf16"].values.ravel(), scores["fp32"].values.ravel()
    assert np.isfinite(got).all()
    assert relative_error(got, ref) <= INFLUENCE_TOLERANCE["bfloat16"] and spearman(got, ref) >= MIN_SPEARMAN, (
        relative_error(got, ref), spearman(got, ref))
