"""The planted-data benchmark: does a ranking find the training data that causes a behaviour?

Plant a share of one answer style in a fine-tuning pool, rank the pool with every estimator against the planted
labels, and measure the behaviour after removing the top of each ranking (:func:`run_planted`, :mod:`.experiment`).
It is what ``concept-influence demo`` runs on the embedded corpus (:mod:`concept_influence.demo`), and what ``bench
planted`` and ``bench medical`` run on two chat files.
"""

from .experiment import run_planted
from .experiment_config import BenchmarkError, PlantedConfig
from .experiment_report import command_line, format_report
from .splits import PlantedSplits, split_planted

__all__ = ["BenchmarkError", "PlantedConfig", "PlantedSplits", "split_planted", "run_planted", "format_report",
           "command_line"]
