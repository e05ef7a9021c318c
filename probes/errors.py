""":class:`ConceptInfluenceError`, the base class of every error of the toolkit that describes bad input or a step that
cannot go on (a file that cannot be read, a setting out of range, a hook that does not exist, a non-finite score),
with a message that says what and where. The command line prints such an error as one line; anything else is a bug.

It lives here, in the lower layer, so that probes' own errors (:class:`~probes.directions.DirectionError`,
:class:`~probes.sae.SAEError`) share it without probes importing :mod:`concept_influence`, which re-exports it.
Each subclass keeps its builtin base too (``class ConfigError(ConceptInfluenceError, ValueError)``), so code that
catches ``ValueError``, ``KeyError`` or ``RuntimeError`` still catches it."""

__all__ = ["ConceptInfluenceError"]


class ConceptInfluenceError(Exception):
    """Bad input, or a step that cannot go on; the message says what and where (printed as one line by the CLI)."""
