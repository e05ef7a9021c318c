"""How closely scores of a model computed in bfloat16 or float16 must agree with the float32 model's: the tolerances
that tests/test_dtype.py (CPU), tests/test_gpu.py (CUDA) and the GPU check (:mod:`.scale_check`) apply, and the two
measures they apply to.

Tolerances. bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ≈ 0.4 %), float16 11 bits (≈ 0.05 %). The low-
precision model differs from the float32 one by its rounded weights and by every activation and gradient rounded
through the forward and backward (~0.5-1 % for bf16 on these 2-block models); covariances, eigenvectors, eigenvalue
corrections, queries and scores are then exact in float32. EK-FAC preconditioning with relative damping 0.1 can
amplify the error in the directions of small eigenvalues. Measured on the tiny models of tests/conftest.py
(TransformerLens, GPT-2, Llama; 32 examples, empirical Fisher): relative error of Concept Influence ≤ 1.8 % (bf16)
and ≤ 0.2 % (fp16), of probe_projection ≤ 0.4 % and ≤ 0.07 %, Spearman ≥ 0.998. The bounds below leave ~2.5x margin.

The true Fisher (labels sampled from the model) is compared separately: the low-precision model's distribution
differs in the third digit, so a few of the labels drawn with the same uniforms differ (4 % of them on the
TransformerLens model), which on a 32-example fit moves Concept Influence by up to ~15 %. That is Monte-Carlo noise
of the Fisher estimate, not lost precision (it shrinks with more fitting data: 4 % at 512 examples)."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

__all__ = ["INFLUENCE_TOLERANCE", "FAST_TOLERANCE", "MIN_SPEARMAN", "relative_error", "spearman"]

#: Largest relative error ‖s − s_fp32‖ / ‖s_fp32‖ allowed for Concept Influence (EK-FAC) scores.
INFLUENCE_TOLERANCE = {"bfloat16": 0.05, "float16": 0.005}
#: The same for the fast path (probe_projection: a forward and one fp32 projection, no curvature).
FAST_TOLERANCE = {"bfloat16": 0.01, "float16": 0.002}
#: Smallest Spearman correlation with the float32 scores (empirical Fisher).
MIN_SPEARMAN = 0.99


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    """‖x − ref‖ / ‖ref‖."""
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def spearman(x: np.ndarray, ref: np.ndarray) -> float:
    return float(spearmanr(x, ref).statistic)
