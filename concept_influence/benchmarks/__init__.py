"""Benchmarks: speed (cost per example, factor fitting, peak memory, kronfluence comparison)."""

from ..provenance import machine_description
from .kronfluence_bridge import kronfluence_concept_scores
from .speed import SpeedConfig, run_speed_benchmark

__all__ = ["SpeedConfig", "run_speed_benchmark", "kronfluence_concept_scores", "machine_description"]
