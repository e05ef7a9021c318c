"""A compressed gradient index: built once over the training data, queried many times.

Building makes one forward+backward pass per checkpoint over the training data (the scoring engine's pipeline) and
stores, for every example and tracked map, a Kronecker projection of its loss gradient (:mod:`.subspace`), sharded
on disk (:mod:`.store`), resumable and split over ``torchrun`` processes (:mod:`.build`, :mod:`.from_runs`). A query (a
concept, K of them at once, or test examples) computes its gradient on its own texts only, projects and
preconditions it in the same space, and scores every stored example with one matrix product streamed over the shards,
summed over the checkpoints (:mod:`.query`), writing the same :class:`~concept_influence.scores.Scores` that scoring
writes.
"""

from .build import IndexSettings
from .gradient_index import GradientIndex
from .store import GradientIndexError
from .subspace import PROJECTIONS, QUERY_CURVATURES

__all__ = ["GradientIndex", "IndexSettings", "GradientIndexError", "PROJECTIONS", "QUERY_CURVATURES"]
