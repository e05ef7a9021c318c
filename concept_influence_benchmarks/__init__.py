"""The benchmarks of concept-influence, a package of their own: left out of the library's wheel, installed by the dev
extra (`pip install -e ".[dev]"`, `make install`) and run by ``concept-influence bench ...``. They import the library
and the library never imports them. Speed (cost per example, factor fitting, peak memory, kronfluence and Bergson
comparisons: :mod:`.speed`, :mod:`.speed_sizes`), memory (:mod:`.memory`), the gradient index (:mod:`.index_bench`),
the emergent testbed (:mod:`.emergent`) and its family of designs (:mod:`.emergent_family`). The planted benchmark,
which the demo runs, is in the library (:mod:`concept_influence.planted`)."""

from .bergson_bridge import bergson_concept_scores
from .kronfluence_bridge import kronfluence_concept_scores
from .speed import SpeedConfig, run_speed_benchmark

__all__ = ["SpeedConfig", "run_speed_benchmark", "kronfluence_concept_scores", "bergson_concept_scores"]
