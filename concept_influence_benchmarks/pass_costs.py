"""What a pass over examples costs, against the gradient floor: the floor itself (a forward and a backward to the
activations only), a training step's forward and backward, and the timing and FLOP counting of passes that the
encoder benchmarks (``benchmarks/encoder_study.py``, ``benchmarks/encoder_cost.py``) and the speed benchmark share.

FLOPs are torch's counter (:class:`torch.utils.flop_counter.FlopCounterMode`: matrix products and attention)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from concept_influence.data import TokenizedExample, iter_batches
from concept_influence.models import ModelAdapter

__all__ = ["cost", "count_flops", "floor", "train_step_pass", "interleaved_costs"]


def count_flops(run: Callable[[], object]) -> int:
    """The FLOPs of one run of ``run()``, by torch's counter."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def cost(run: Callable[[], object], repeats: int = 3) -> dict:
    """The fastest of ``repeats`` runs of ``run()`` after a warm-up (seconds) and its FLOPs (the warm-up, counted)."""
    flops = count_flops(run)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "flops": flops}


def floor(adapter: ModelAdapter, examples: Sequence[TokenizedExample], batch_size: int) -> None:
    """One forward plus a backward to the activations only (no weight gradient): the gradient floor. The backward
    reaches the input of block 0, so it runs through every block and the unembedding but forms no weight gradient."""
    leaves = []

    def leaf(act: torch.Tensor) -> torch.Tensor:  # not a leaf itself: torch's FLOP counter cannot differentiate one
        leaves.append(act.detach().requires_grad_() * 1.0)
        return leaves[-1]

    params = [p for p in adapter.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with adapter.edit_activation("blocks.0.hook_resid_pre", leaf):
            for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
                leaves.clear()
                torch.autograd.grad(adapter.per_example_loss(batch).sum(), leaves)
    finally:
        for p in params:
            p.requires_grad_(True)


def train_step_pass(adapter: ModelAdapter, examples: Sequence[TokenizedExample], batch_size: int) -> None:
    """One forward plus a backward with the weights' gradients, as training computes them."""
    for batch in iter_batches(examples, batch_size, adapter.pad_token_id):
        adapter.model.zero_grad(set_to_none=True)
        adapter.per_example_loss(batch).sum().backward()
    adapter.model.zero_grad(set_to_none=True)


def interleaved_costs(passes: dict[str, Callable[[Sequence[TokenizedExample]], object]],
                      examples: Sequence[TokenizedExample], repeats: int = 3,
                      flop_examples: Sequence[TokenizedExample] | None = None, log: Callable[[str], None] | None = None
                      ) -> dict[str, dict]:
    """Per example, each pass's seconds and FLOPs. Each pass is ``run(examples)``; its FLOPs are counted on
    ``flop_examples`` (default: all of ``examples``; one batch is enough where the examples are alike), which is
    also its warm-up; then every pass runs on ``examples`` ``repeats`` times, interleaved (round r runs them in order,
    the next round in reverse, so that a drift of the machine's speed falls on all alike). ``seconds`` is the median
    of the repeats, ``runs`` each repeat's seconds (per example)."""
    flop_examples = examples if flop_examples is None else flop_examples
    out = {name: {"flops": count_flops(lambda run=run: run(flop_examples)) / len(flop_examples), "runs": []}
           for name, run in passes.items()}
    names = list(passes)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            passes[name](examples)
            out[name]["runs"].append((time.perf_counter() - t0) / len(examples))
            if log:
                log(f"round {r + 1}/{repeats}: {name} {out[name]['runs'][-1] * 1e3:.1f} ms per example")
    for row in out.values():
        row["seconds"] = statistics.median(row["runs"])
    return out
