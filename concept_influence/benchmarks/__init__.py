"""Benchmarks: speed (cost per example, factor fitting, peak memory, kronfluence and Bergson comparisons)."""

from ..provenance import machine_description
from .bergson_bridge import bergson_concept_scores
from .kronfluence_bridge import kronfluence_concept_scores
from .speed import SpeedConfig, run_speed_benchmark

__all__ = ["SpeedConfig", "run_speed_benchmark", "kronfluence_concept_scores", "bergson_concept_scores",
           "machine_description"]
