"""Curvature methods by strategy name, so that fitting, loading, run configs, the memory plan and the index ask here
instead of listing names.

A :class:`~concept_influence.curvature.Curvature` subclass registers itself when it is defined, with what it declares:

* ``strategies = {name: passes}``: the names it implements, each with the passes over the data that
  :func:`~concept_influence.curvature.fit_curvature` makes for it (``"covariance"``, then ``"eigenvalues"``; ``()``
  for none), or ``None`` for a method built from something else rather than fitted (unrolled preconditioning from a
  fitted curvature, the Adam correction from an optimizer's state);
* ``has_eigenbasis``: it holds a Kronecker eigenbasis per map (``factors``) and preconditions by a weight per
  eigen-direction (``eigen_weights``), which the index's ``eigen`` projection needs;
* ``has_damping``: that weight is the damped inverse ``1 / (σ + λ)`` with ``dampings`` per map, which the ``random``
  projection needs to restrict ``F + λI`` to a subspace.

Every module of this package is imported at the first lookup, so a method in a new file needs no edit elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["register", "method", "passes", "StrategyNames", "STRATEGIES", "FITTED", "FITTED_FROM_DATA",
           "RUN_STRATEGIES"]

_METHODS: dict[str, type] = {}
_discovered = False


def register(cls: type) -> None:
    """Register each of ``cls.strategies``; a name another class holds is refused (a reloaded module replaces its own)."""
    for name in cls.strategies:
        other = _METHODS.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"curvature strategy {name!r} is already registered by {other.__qualname__}")
        _METHODS[name] = cls


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            importlib.import_module(f"{__package__}.{module.name}")


def method(name: str) -> type | None:
    """The class that implements strategy ``name`` (None when none does)."""
    _discover()
    return _METHODS.get(name)


def passes(name: str) -> tuple[str, ...] | None:
    """The passes over the data that fitting strategy ``name`` makes (None: not fitted, built from another curvature)."""
    cls = method(name)
    if cls is None:
        raise ValueError(f"unknown curvature strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return cls.strategies[name]


class StrategyNames:
    """The registered names that ``where(cls, passes)`` keeps, read at each use (so a method registered later is
    among them): usable as a settings field's ``choices``, in ``in`` tests and in messages."""

    def __init__(self, where: Callable[[type, tuple[str, ...] | None], bool] = lambda cls, passes: True) -> None:
        self.where = where

    def _names(self) -> list[str]:
        _discover()
        return [name for name, cls in _METHODS.items() if self.where(cls, cls.strategies[name])]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(tuple(self))


#: every registered strategy (what :meth:`Curvature.load` reads back)
STRATEGIES = StrategyNames()
#: the strategies :func:`~concept_influence.curvature.fit_curvature` fits
FITTED = StrategyNames(lambda cls, passes: passes is not None)
#: those fitted from at least one pass over the data (a run folder's ``[factors]``, the memory plan)
FITTED_FROM_DATA = StrategyNames(lambda cls, passes: bool(passes))
#: a run folder's ``[factors] strategy``: those fitted from the data, and ``adam_state``, which a run reads from the
#: fine-tune's ``optimizer.pt`` (:mod:`concept_influence.runs.optimizer`)
RUN_STRATEGIES = StrategyNames(lambda cls, passes: bool(passes) or "adam_state" in cls.strategies)
