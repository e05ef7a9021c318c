"""torch.distributed for run folders: one process per rank, launched by ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`process_group` joins the process group
(NCCL when CUDA is available, gloo on CPU) and each rank uses ``cuda:LOCAL_RANK`` or the CPU. Shards of the
data are dealt to ranks in turn (shard ``i`` to rank ``i mod world_size``); curvature statistics are summed
over ranks with ``all_reduce``, or each map's onto the rank that owns it (:meth:`Ranks.reduce_to_owners`, run
folders' owner ranks: :mod:`.runs.owners`); files are written by the rank that owns them, shared files by rank 0.
When one rank fails, ``torchrun`` stops the others; every shard already written stays valid for a resume.
Without ``torchrun`` everything runs in one process and the same code paths apply with world size 1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

from .curvature import SumStats

__all__ = ["Ranks", "process_group"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` processes, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard_index: int) -> bool:
        """Whether this rank computes shard ``shard_index``."""
        return shard_index % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def main_first(self, make: Callable[[bool], T]) -> T:
        """``make(True)`` on rank 0, then, after a barrier, ``make(False)`` on the other ranks: for what rank 0 makes
        and the others only read (a run folder that rank 0 creates)."""
        made = make(True) if self.is_main else None
        self.barrier()
        return made if self.is_main else make(False)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so that all ranks take the same collective path)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _union(self, stats: SumStats) -> tuple[list[str], dict, list[int]]:
        """The keys of ``stats`` on any rank (sorted), their shape and dtype, and their counts summed over ranks."""
        shapes = [None] * self.world_size
        dist.all_gather_object(shapes, {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in stats.sums.items()})
        union = {k: spec for rank_shapes in shapes for k, spec in rank_shapes.items()}
        keys = sorted(union)
        counts = torch.tensor([stats.counts.get(k, 0) for k in keys], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        return keys, union, counts.tolist()

    def _local(self, stats: SumStats, key: str, spec: tuple) -> tuple[torch.Tensor, torch.device]:
        """This rank's sum of ``key`` on the collective's device (zeros where it has none), and the device the result
        goes back to (the local sum's, else the CPU)."""
        local = stats.sums.get(key)
        if local is None:
            return torch.zeros(spec[0], dtype=getattr(torch, spec[1]), device=self.device), torch.device("cpu")
        return local.to(self.device), local.device

    def all_reduce(self, stats: SumStats) -> SumStats:
        """Sum ``stats`` (sums and counts) over all ranks; every rank gets the same total. A rank that saw
        no data (more ranks than shards) contributes zeros."""
        if self.world_size == 1:
            return stats
        keys, union, counts = self._union(stats)
        out = SumStats()
        for key, count in zip(keys, counts):
            total, home = self._local(stats, key, union[key])
            total = total.clone()
            dist.all_reduce(total)
            out.sums[key], out.counts[key] = total.to(home), int(count)
        return out

    def reduce_to_owners(self, stats: SumStats, owner: Mapping[str, int]) -> SumStats:
        """Sum ``stats`` over all ranks, each sum onto its owner only (``torch.distributed.reduce``): ``owner`` maps a
        map's name to its rank, and a key is a map's name or ``<map>/<side>``. Returns the sums this rank owns and the
        counts of every key. ``stats`` is consumed (each local sum is dropped once sent, and may be overwritten)."""
        if self.world_size == 1:
            return stats
        keys, union, counts = self._union(stats)
        out = SumStats()
        for key, count in zip(keys, counts):
            dst = owner[key] if key in owner else owner[key.rsplit("/", 1)[0]]
            total, home = self._local(stats, key, union[key])
            stats.sums.pop(key, None)
            dist.reduce(total, dst=dst)
            if dst == self.rank:
                out.sums[key] = total.to(home)
            out.counts[key] = int(count)
        return out


@contextmanager
def process_group(device: str = "auto") -> Iterator[Ranks]:
    """Join the ``torchrun`` process group if there is one (and leave it afterwards); yield this process's
    :class:`Ranks`. ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world_size == 1:
        yield Ranks(device="cuda" if use_cuda else "cpu")
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield Ranks(rank, world_size, f"cuda:{local_rank}" if use_cuda else "cpu")
    finally:
        if owned:
            dist.destroy_process_group()
