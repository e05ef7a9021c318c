"""What the retrieval benchmarks' pool builder (``benchmarks/retrieval_large_pool.py``) writes and its readers
(``retrieval_coverage.py``, ``retrieval_learned.py``) read back: the ``seconds.json`` stages that make up each first
stage's own cost, and the ``--design audit`` corpus."""

from __future__ import annotations

__all__ = ["ENCODER_INDEX", "FIRST_STAGES", "AUDIT", "audit_corpus"]

#: the ``seconds.json`` stage of the encoders' shared sample index (charged to each encoder)
ENCODER_INDEX = "encoder: index of the sample"
#: first stages a pool folder may hold (``scores/<name>.safetensors``) with the ``seconds.json`` stages of their own
#: cost; the last is the stage the builder times as that first stage's own work
FIRST_STAGES = {"probe_projection": ("fast path",),
                "encoder": (ENCODER_INDEX, "encoder: fit and codes"),
                "encoder[block 0]": (ENCODER_INDEX, "encoder[block 0]: fit and codes")}

#: notebook 07's full-size settings, for ``--design audit``
AUDIT = dict(n_probe=150, n_eval=24, vocab_size=1024, d_model=64, max_length=128, max_new_tokens=40, n_layers=2,
             n_heads=4, epochs=2, lr=2e-3, batch_size=16, fit_share=0.1)


def audit_corpus(n_pool: int, rate: float = 0.05, seed: int = 0, n_probe: int = AUDIT["n_probe"],
                 n_eval: int = AUDIT["n_eval"]):
    """The ``--design audit`` corpus (``make_demo_corpus`` with varied prompts, as notebook 07)."""
    from concept_influence.toy import make_demo_corpus

    return make_demo_corpus(n_pool, rate, n_probe, n_eval, seed, varied=True)
