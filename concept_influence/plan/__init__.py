"""A memory plan before a run (issue 27, item 1): bytes per stage on the device, on the host and on disk, read from the
model's config alone (the model is built on the ``meta`` device: shapes, no weights), and the partitions of maps that
make each pass fit the device.

Formulas (DESIGN.md, "Memory at the paper's scale"), per tracked map of shape d_out × d_in, in the factors' dtype
(float32 unless chosen): covariances d_in² + d_out²; eigenvectors the same again; corrected eigenvalues d_out·d_in;
a concept's query d_out·d_in per concept. A LoRA factor is a map like any other (``lora_A`` r × d_in keeps the
d_in² side, ``lora_B`` d_out × r the d_out² side). The eigendecomposition of an n × n factor works on a float64 copy
and its float64 eigenvectors: 16·n² bytes for the larger side of the map being decomposed.

What else is counted, per rank (an estimate: see :func:`activation_bytes`): the weights in the model's dtype; the
activations kept for the backward of one batch of ``batch_size × max_length`` tokens; each tracked map's captured
input and output gradient for that batch; the full-vocabulary float32 log-softmax and its gradient.

Two engines are planned (``Plan.engine``):

* ``"current"``: what the code does today. All tracked maps are fitted at once (one covariance pass, one eigenvalue
  pass); every factor stays on the device through the eigendecomposition; under ``torchrun`` every rank holds the
  whole model and, after the all-reduce, every factor. ``run`` checks this plan before any work.
* ``"partitioned"``: the engine issue 27 items 3-4 describe. The maps are dealt to the ranks (largest
  eigendecomposition cost first, to the least loaded rank), each rank's maps are split in order into partitions whose
  covariance pass, eigendecomposition (one map at a time, results off the device) and eigenvalue pass each fit the
  device with ``margin`` to spare; each partition costs one covariance and one eigenvalue pass over the data. With
  more than one rank the weights are sharded (FSDP: a rank holds 1/N of them and one whole block at a time) and each
  map's activations go to its owner. ``concept-influence plan`` prints this plan (and says whether the current engine
  fits as well). Run folders under ``torchrun`` deal the owners the same way (:func:`deal`) but shard no weights and
  route no activations: each rank's passes hold the whole partition's sums, so ``run`` checks the plan of one rank
  (docs/scale.md, "Owner ranks").
"""

from .memory import QUERY_RANKS, activation_bytes, plan_memory
from .report import Plan, PlanSettings, StageBytes
from .shapes import (
    DTYPE_BYTES,
    PAPER_SHAPES,
    STAGES,
    MapShape,
    ModelShape,
    PlanError,
    deal,
    format_bytes,
    model_shape,
    paper_config,
    parse_bytes,
    parse_device_memory,
)

__all__ = ["PlanError", "MapShape", "ModelShape", "PlanSettings", "StageBytes", "Plan", "plan_memory", "parse_bytes",
           "format_bytes", "STAGES", "DTYPE_BYTES", "model_shape", "PAPER_SHAPES", "paper_config",
           "activation_bytes", "QUERY_RANKS", "parse_device_memory", "deal"]
