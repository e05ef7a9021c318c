"""The index benchmark's settings (:class:`IndexBenchConfig`), in a module of their own: :mod:`.index_bench` runs
them and its report (:mod:`.index_bench_report`) reads their defaults to write the command that made a run, and
neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IndexBenchConfig"]


@dataclass
class IndexBenchConfig:
    """What the index benchmark measures; the defaults are the committed run (one torch thread)."""

    size: str = "gpt2-small"
    n_examples: int = 48
    seq_len: int = 128
    concept_layer: int = 3
    n_concepts: int = 4
    n_eval: int = 8
    n_test: int = 4
    many: int = 100
    rows: tuple[int, ...] = (10_000, 100_000)
    seeds: int = 5
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    budget: int = 65536
    bergson: bool = True
    quick: bool = False

    def __post_init__(self):
        if self.quick:
            self.size, self.n_examples, self.seq_len, self.concept_layer = "tiny", 16, 32, 1
            self.many, self.rows, self.seeds, self.ranks, self.budget = 10, (2000,), 1, (4,), 4096
