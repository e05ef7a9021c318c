"""One way to name what a gradient estimator measures, the same in the Python API, a run config's ``[concept]``, the
command line (``index query``, ``concept check``) and the gradient index: a :class:`ConceptSpec`, built by
:func:`build_concept`.

A spec names one *type* of concept by the fields it gives:

- ``directions``: saved concept directions (a probe, a difference of means or persona vector), K measured together;
- ``sae`` + ``latents``: K SAE latents (their activations, or projections on their decoder rows / encoder columns);
- ``test``: test examples (classic influence on their mean loss instead of a concept).

Each type is registered in :data:`CONCEPT_TYPES` with how it is built, which gradient estimator scores it and which
direction the concept check steers along; adding a type is one :func:`concept_type` function here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable

from probes.activations import REDUCTIONS
from probes.directions import ConceptDirection

from .concepts import DEFAULT_QUERY, ConceptError, ConceptFunction, check_direction_compatible
from .data import TokenizedExample, read_tokenized
from .models import ModelAdapter
from .options import Settings, accepts, option
from .sae_concepts import LATENT_CONCEPT_KINDS

__all__ = ["ConceptSpec", "ConceptType", "CONCEPT_TYPES", "concept_type", "build_concept", "query_estimator",
           "steering_direction"]

#: ``read(path, limit)``: the first ``limit`` (None: all) examples of a chat file, tokenised for the model.
Reader = Callable[[str, "int | None"], list[TokenizedExample]]


@dataclass
class ConceptSpec(Settings):
    """What is measured: ``directions``, or ``sae`` with ``latents``, or ``test`` examples (exactly one of these), read
    at ``hook`` on the ``eval`` texts (at most ``max_examples``; at the tokens ``reduction`` says). Each field's help
    text is the run config's and the command line's."""

    directions: list[str] | None = option(None, "saved concept directions (.safetensors + .json: a probe, a difference of "
                                           "means or persona vector) at one hook, measured together", path=True)
    sae: str | None = option(None, "an SAE folder (SAE-Lens format) whose latents are the concepts", path=True)
    latents: list[int] | None = option(None, "with sae: the latent indices, measured together")
    sae_kind: str = option("activation", "with sae: the latents' activations, or projections on their decoder rows or "
                                         "encoder columns", choices=LATENT_CONCEPT_KINDS)
    test: str | None = option(None, "test examples: classic influence on their mean loss instead of a concept", path=True)
    hook: str | None = option(None, "the hook the concept is read at: a direction's own (checked), or where the SAE is "
                                    "applied (default: its own)")
    eval: str | None = option(None, "the texts the concept is averaged over (what the behaviour looks like)", path=True)
    max_examples: int | None = option(256, "evaluation (or test) examples read; unset: all", minimum=1)
    reduction: str = option(DEFAULT_QUERY, "the tokens the concept is read at on the evaluation texts (the query)",
                            choices=REDUCTIONS)

    def check_together(self) -> None:
        hints = typing.get_type_hints(type(self))
        for name in ("directions", "latents"):
            value = getattr(self, name)
            if value is not None and not (value and accepts(value, hints[name])):
                item = typing.get_args(typing.get_args(hints[name])[0])[0]
                raise ValueError(f"{name} must be a non-empty list of {item.__name__}, got {value!r}")

    @property
    def given(self) -> list[str]:
        """The registered types whose fields this spec gives."""
        return [name for name, t in CONCEPT_TYPES.items() if all(getattr(self, f) is not None for f in t.needs)]

    @property
    def type(self) -> str:
        """The one type this spec names; :class:`ConceptError` for none or several."""
        given = self.given
        if len(given) != 1:
            ways = "; ".join(f"{t}: {' + '.join(CONCEPT_TYPES[t].needs)}" for t in CONCEPT_TYPES)
            raise ConceptError(f"name the concept in exactly one way ({ways}); "
                               + (f"got {' and '.join(given)}" if given else "got none"))
        return given[0]


@dataclass(frozen=True)
class ConceptType:
    """A registered way to name a concept: the spec fields it ``needs``, how it is ``build``-t (from the spec, the
    model and the examples of the spec's chat file ``examples``: the evaluation texts, or the test examples), the
    gradient estimator that scores it (``estimator(built, preconditioned)``) and the direction the concept check steers
    along (None: not checkable)."""

    needs: tuple[str, ...]
    build: Callable[[ConceptSpec, ModelAdapter, "list[TokenizedExample] | None"], Any]
    estimator: Callable[..., Any]
    direction: Callable[[ConceptSpec, ModelAdapter], ConceptDirection] | None = None
    examples: str = "eval"


CONCEPT_TYPES: dict[str, ConceptType] = {}


def concept_type(name: str, needs: tuple[str, ...], estimator: Callable[..., Any],
                 direction: Callable[[ConceptSpec, ModelAdapter], ConceptDirection] | None = None,
                 examples: str = "eval"):
    """Register the decorated ``build(spec, adapter, examples)`` as concept type ``name`` (see :class:`ConceptType`)."""

    def register(build):
        CONCEPT_TYPES[name] = ConceptType(needs, build, estimator, direction, examples)
        return build

    return register


def _concept_estimator(concept: ConceptFunction, preconditioned: bool, **options):
    from .estimators import ConceptGradDot, ConceptInfluence

    return ConceptInfluence(concept, **options) if preconditioned else ConceptGradDot(concept, **options)


def _test_estimator(test: list[TokenizedExample], preconditioned: bool, **options):
    from .estimators import GradDot, InfluenceFunction

    return InfluenceFunction(test, **options) if preconditioned else GradDot(test, **options)


def _check_hook(spec: ConceptSpec, hook: str, what: str) -> str:
    if spec.hook is not None and spec.hook != hook:
        raise ConceptError(f"{what} is at hook {hook!r}, but the concept's hook is {spec.hook!r}")
    return hook


def _directions(spec: ConceptSpec, adapter: ModelAdapter) -> list[ConceptDirection]:
    out = []
    for path in spec.directions:
        direction = ConceptDirection.load(path)
        _check_hook(spec, direction.hook_name, f"the direction {path}")
        check_direction_compatible(direction, adapter)
        out.append(direction)
    return out


@concept_type("direction", ("directions",), _concept_estimator, direction=lambda spec, adapter: _directions(spec, adapter)[0])
def _direction_concept(spec: ConceptSpec, adapter: ModelAdapter, examples) -> ConceptFunction:
    return ConceptFunction.from_directions(_directions(spec, adapter), examples, spec.reduction)


def _sae_direction(spec: ConceptSpec, adapter: ModelAdapter) -> ConceptDirection:
    from probes.sae import load_sae, sae_direction

    from .sae_concepts import check_sae_compatible

    sae = load_sae(spec.sae)
    check_sae_compatible(sae, adapter, spec.hook)
    return sae_direction(sae, spec.latents[0], "decoder", hook_name=spec.hook)


@concept_type("sae_latent", ("sae", "latents"), _concept_estimator, direction=_sae_direction)
def _latent_concept(spec: ConceptSpec, adapter: ModelAdapter, examples) -> ConceptFunction:
    from probes.sae import load_sae

    from .sae_concepts import latent_concept

    return latent_concept(load_sae(spec.sae), spec.latents, examples, kind=spec.sae_kind, adapter=adapter,
                          hook_name=spec.hook, reduction=spec.reduction)


@concept_type("test_examples", ("test",), _test_estimator, examples="test")
def _test_examples(spec: ConceptSpec, adapter: ModelAdapter, examples) -> list[TokenizedExample]:
    if not examples:
        raise ConceptError(f"{spec.test}: no test example to read")
    return examples


def _reader(adapter: ModelAdapter) -> Reader:
    def read(path: str, limit: int | None) -> list[TokenizedExample]:
        return read_tokenized([path], adapter.tokenizer, adapter.context_length or 512, limit)

    return read


def build_concept(spec: ConceptSpec, adapter: ModelAdapter, read: Reader | None = None, with_eval: bool = True):
    """What ``spec`` names, for ``adapter``: a :class:`~.concepts.ConceptFunction` averaged over the ``eval`` texts
    (none with ``with_eval=False``: the fast path reads each training example itself), or for ``test`` the tokenised
    test examples. ``read`` tokenises a chat file (default: for the model's context length, skipping examples whose
    response is cut away)."""
    t = CONCEPT_TYPES[spec.type]
    if not with_eval and t.examples == "eval":
        return t.build(spec, adapter, None)
    path = getattr(spec, t.examples)
    if path is None:
        raise ConceptError(f"the concept needs {t.examples}: the chat file it is measured on")
    return t.build(spec, adapter, (read or _reader(adapter))(path, spec.max_examples))


def query_estimator(spec: ConceptSpec, adapter: ModelAdapter, read: Reader | None = None, preconditioned: bool = True,
                    **options):
    """The gradient estimator that scores ``spec``: Concept Influence (``preconditioned``) or concept gradient-dot,
    or for test examples classic influence or gradient-dot; ``options`` go to the estimator (e.g. ``loss_tokens``)."""
    return CONCEPT_TYPES[spec.type].estimator(build_concept(spec, adapter, read), preconditioned, **options)


def steering_direction(spec: ConceptSpec, adapter: ModelAdapter) -> ConceptDirection:
    """The direction the concept check steers along: the first direction, or the first latent's decoder row."""
    kind = spec.type
    direction = CONCEPT_TYPES[kind].direction
    if direction is None:
        raise ConceptError(f"a concept named by {' + '.join(CONCEPT_TYPES[kind].needs)} has no direction to steer along")
    return direction(spec, adapter)
