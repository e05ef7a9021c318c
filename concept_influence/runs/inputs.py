"""The data a run folder's stages read, in shards: the training data (scored), and what the factors are fitted on, the
training data (up to ``[factors] max_examples``) then, with ``[factors] extra_data``, as many extra examples."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..config import RunConfig
from ..data import ChatExample, DataError, Shard, TokenizedExample, iter_shards
from ..fileio import path_sha256, refuse_same_data
from .folder import RunError

__all__ = ["RunData"]

EXTRA = "factors.extra_data"
#: ``[factors]`` keys added after run folders were first written, with their defaults: left out of ``settings.json``
#: at these values, so that a folder written before them resumes (a key missing there reads as unset)
LATER_KEYS = {"covariance_dtype": "auto", "partitions": "auto", "optimizer_state": None, "power": 2}


class RunData:
    """Shards of the run's data and their digests (each layout read once per process); ``kept`` tokenises a shard's
    examples, skipping those whose response is cut away at ``data.max_length``."""

    def __init__(self, cfg: RunConfig, kept: Callable[[Sequence[ChatExample]], list[TokenizedExample]]):
        self.cfg, self.kept = cfg, kept
        self._digests: dict[tuple, list[str]] = {}

    def shards(self, shard_size: int, limit: int | None = None, then: tuple = ()) -> Iterator[Shard]:
        """The training data's shards (its first ``limit`` examples, then ``then``: see :func:`iter_shards`)."""
        return iter_shards(self.cfg.data.train, shard_size, limit, then)

    def digests(self, shard_size: int, limit: int | None = None, then: tuple = ()) -> list[str]:
        """The SHA-256 of each shard's records (read once per process and shard layout)."""
        key = (shard_size, limit, then)
        if key not in self._digests:
            self._digests[key] = [shard.digest for shard in self.shards(shard_size, limit, then)]
            if not self._digests[key]:
                raise RunError(f"{self.cfg.data.train}: the file has no examples")
        return self._digests[key]

    # ---- what the factors are fitted on -----------------------------------------------------------
    @cached_property
    def fit_limits(self) -> tuple[int | None, tuple]:
        """``(limit, then)`` of the factors' shards: ``[factors] max_examples`` of the training data alone, or, with
        ``extra_data``, the number of training examples read then ``((extra_data, n_extra),)``. Counts are of
        records read (those cut away at ``max_length`` are skipped when fitting, as in the training data)."""
        f, train = self.cfg.factors, self.cfg.data.train
        if f.extra_data is None:
            return f.max_examples, ()
        extra = self.extra_path
        refuse_same_data(("data.train", train), (EXTRA, extra), "the extra data is fitted on besides the training "
                         "data: give a sample of what the model was trained on before the fine-tune", RunError)
        n_train = sum(len(shard.examples) for shard in iter_shards(train, 1024, f.max_examples))
        if n_train == 0:
            raise RunError(f"{train}: the file has no examples")
        n_extra = usable = 0
        for shard in iter_shards(extra, 1024, f.extra_max_examples or n_train):
            n_extra, usable = n_extra + len(shard.examples), usable + len(self.kept(shard.examples))
        if not usable:
            why = (f"all {n_extra} have their response cut away at max_length {self.cfg.data.max_length}" if n_extra
                   else "it has no examples")
            raise DataError(f"{extra}: no usable examples ({why}) ({EXTRA})")
        return n_train, ((extra, n_extra),)

    def fit_shards(self) -> Iterator[Shard]:
        """The shards the factors are fitted on (``[factors] shard_size`` examples each)."""
        return self.shards(self.cfg.factors.shard_size, *self.fit_limits)

    def fit_digests(self) -> list[str]:
        """The SHA-256 of each of :meth:`fit_shards`."""
        return self.digests(self.cfg.factors.shard_size, *self.fit_limits)

    @property
    def fit_source(self) -> str:
        """What the factors are fitted on, for errors."""
        extra = self.cfg.factors.extra_data
        return self.cfg.data.train if extra is None else f"{self.cfg.data.train} and {extra}"

    @property
    def extra_path(self) -> str:
        """``[factors] extra_data``; a :class:`RunError` naming the key when it is missing."""
        extra = self.cfg.factors.extra_data
        if extra is None or not Path(extra).exists():
            raise RunError(f"{extra}: no such file or folder ({EXTRA})")
        return extra

    @cached_property
    def fit_settings(self) -> dict:
        """The ``[factors]`` settings saved with the factors and compared when they resume
        (:meth:`~.folder.Run.check_settings`); with ``extra_data``, its SHA-256 too, so a changed file is refused as a
        changed setting."""
        settings = {k: v for k, v in self.cfg.factors.to_dict().items() if LATER_KEYS.get(k, ...) != v}
        if self.cfg.factors.extra_data is not None:
            settings["extra_data_sha256"] = path_sha256(self.extra_path)
        return settings

    @property
    def fitted_on(self) -> dict:
        """What ``run.json`` notes for the factors stage about the data they were fitted on: with ``extra_data``,
        ``fitted_on``, the numbers of training and extra examples read and the extra file with its SHA-256."""
        if self.cfg.factors.extra_data is None:
            return {}
        n_train, ((extra, n_extra),) = self.fit_limits
        return {"fitted_on": {"train_examples": n_train, "extra_examples": n_extra, "extra_data": extra,
                              "extra_data_sha256": self.fit_settings["extra_data_sha256"]}}


def describe_fit(fitted_on: dict) -> str:
    """``600 training + 600 extra examples (data/pretrain.jsonl)``: a :attr:`RunData.fitted_on` entry in words."""
    return (f"{fitted_on['train_examples']} training + {fitted_on['extra_examples']} extra examples "
            f"({fitted_on['extra_data']})")
