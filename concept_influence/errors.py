"""The base class of the package's errors, :class:`ConceptInfluenceError` (defined in :mod:`probes.errors`, the lower
layer, so that probes' errors share it); every error of ``concept_influence`` and ``probes`` that describes bad input
subclasses it, and the command line prints it as one line."""

from probes.errors import ConceptInfluenceError

__all__ = ["ConceptInfluenceError"]
