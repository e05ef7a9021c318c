"""concept-influence: which training examples put a concept into a language model.

The entry points a first audit needs are importable from here; everything else lives in its module
(``concept_influence.data``, ``.models``, ``.curvature``, ``.estimators``, ``.index``, ``.runs``...). The heavier
entry points are imported on first use, so that ``import concept_influence`` (and the command line) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .data import DataError, load_chats, tokenize_examples
from .errors import ConceptInfluenceError
from .models import as_adapter, load_model

if TYPE_CHECKING:  # for type checkers and the API reference; imported on first use at run time (__getattr__)
    from .activations import collect_activations
    from .concept_spec import ConceptSpec, build_concept
    from .concepts import ConceptFunction
    from .curvature import fit_curvature
    from .estimators import ConceptInfluence, InfluenceFunction, SourceInfluence
    from .index import GradientIndex
    from .runs import run_config
    from .scores import Scores
    from .stability import check_stability

__version__ = "0.1.0"

#: The entry points imported on first use: name -> the module that defines it.
_ON_FIRST_USE = {
    "collect_activations": "activations", "ConceptSpec": "concept_spec", "build_concept": "concept_spec",
    "ConceptFunction": "concepts", "fit_curvature": "curvature",
    "ConceptInfluence": "estimators", "InfluenceFunction": "estimators", "SourceInfluence": "estimators",
    "GradientIndex": "index", "run_config": "runs", "Scores": "scores", "check_stability": "stability",
}

__all__ = ["ConceptInfluenceError", "DataError", "load_chats", "tokenize_examples", "load_model", "as_adapter",
           "collect_activations", "ConceptSpec", "build_concept", "ConceptFunction", "fit_curvature", "ConceptInfluence",
           "InfluenceFunction", "SourceInfluence", "GradientIndex", "run_config", "Scores", "check_stability"]


def __getattr__(name: str) -> Any:
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))
