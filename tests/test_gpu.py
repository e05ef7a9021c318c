"""The bfloat16 scoring path on CUDA against float32 on CPU (tolerances in tests/lowprecision.py).

Every test is marked ``gpu`` (``pytest -m gpu`` runs only these) and is SKIPPED, with the reason, where no CUDA
device is available: ``pytest -rs`` lists them. Nothing here passes without having run on a GPU."""

import json

import numpy as np
import pytest
import torch
from lowprecision import (
    INFLUENCE_TOLERANCE,
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

from concept_influence.config import RunConfig
from concept_influence.curvature import Curvature
from concept_influence.data import tokenize_examples
from concept_influence.estimators import ConceptInfluence
from concept_influence.models import load_model, save_model
from concept_influence.runs import run_config
from concept_influence.scores import Scores
from conftest import make_chats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the bfloat16 GPU path is not tested here"),
]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_examples(make_chats(32, seed=3), tokenizer, max_length=64)


def test_bfloat16_on_cuda_agrees_with_float32_on_cpu(any_adapter, examples):
    """EK-FAC fitted and Concept Influence / probe_projection scored on CUDA in bf16: factors on the GPU in float32,
    scores within the bf16 tolerances of the CPU float32 model's."""
    concept = random_concept(any_adapter.d_model, examples[:4])
    ref = score_both(any_adapter, concept, examples)
    gpu = cast(any_adapter, torch.bfloat16, "cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    got = score_both(gpu, concept, examples)
    assert {f.q_a.device.type for f in got["curvature"].factors.values()} == {"cuda"}
    assert_accumulated_in_float32(gpu, got)
    print(f"{type(any_adapter.model).__name__} bf16 on CUDA: {assert_agrees(got, ref, 'bfloat16')}")


def test_curvature_saved_and_loaded_on_cuda(tl_adapter, examples, tmp_path):
    """load_model(device="cuda", dtype="bfloat16"); factors saved from the GPU and loaded back onto it score the same."""
    save_model(tl_adapter, tmp_path / "m")
    gpu = load_model(tmp_path / "m", device="cuda", dtype="bfloat16")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    concept = random_concept(gpu.d_model, examples[:4])
    first = score_both(gpu, concept, examples)
    first["curvature"].save(tmp_path / "factors")
    loaded = Curvature.load(tmp_path / "factors", gpu)
    assert {f.q_a.device.type for f in loaded.factors.values()} == {"cuda"}
    again = ConceptInfluence(concept, loaded).score(gpu, examples, batch_size=8, progress=False).column(0)
    np.testing.assert_allclose(again, first["influence"], rtol=1e-5, atol=1e-7)


def test_run_folder_on_cuda_in_bfloat16(tmp_path):
    """``[model] device = "cuda"``, ``dtype = "bfloat16"``: the run's scores agree with a CPU float32 run's."""
    project = make_project(tmp_path, n_train=32)
    text = (project / "run.toml").read_text().replace("[factors]\n", '[factors]\nfisher = "empirical"\n')
    (project / "cpu.toml").write_text(text.replace('path = "model"\n', 'path = "model"\ndevice = "cpu"\n'))
    (project / "gpu.toml").write_text(text.replace('path = "model"\n', 'path = "model"\ndevice = "cuda"\ndtype = "bfloat16"\n'))
    scores = {}
    for name in ("cpu", "gpu"):
        run_config(RunConfig.read(project / f"{name}.toml"), project / "runs" / name, progress=False)
        scores[name] = Scores.load(project / "runs" / name / "scores" / "scores.safetensors")
    assert json.loads((project / "runs" / "gpu" / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    got, ref = scores["gpu"].values.ravel(), scores["cpu"].values.ravel()
    assert scores["gpu"].ids == scores["cpu"].ids and np.isfinite(got).all()
    assert relative_error(got, ref) <= INFLUENCE_TOLERANCE["bfloat16"] and spearman(got, ref) >= MIN_SPEARMAN, (
        relative_error(got, ref), spearman(got, ref))
