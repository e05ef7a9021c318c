"""The :class:`Curvature` interface: precondition per-map gradients, save, load.

A saved curvature is a folder with two files, each written atomically (temporary file + ``os.replace``):

* ``curvature.safetensors`` — the tensors (never pickle);
* ``curvature.json`` — format and version, strategy, Fisher type, damping, the fitted maps with their
  ``(d_out, d_in)`` shapes, the number of examples, and the fingerprint of the model it was fitted on.

A curvature with an eigenbasis per map may instead keep each map's factors in its own file (format version 2,
``"storage": "maps"``: :mod:`.stored`), read back one map at a time; folders of version 1 are read as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import ConceptInfluenceError
from ..fileio import atomic_write_text, load_tensors, save_tensors
from . import registry

__all__ = ["Curvature", "CurvatureError", "CONFIG_FILE", "TENSOR_FILE", "FORMAT", "FORMAT_VERSION", "MAPS_FORMAT_VERSION"]

CONFIG_FILE = "curvature.json"
TENSOR_FILE = "curvature.safetensors"
FORMAT = "concept-influence-curvature"
FORMAT_VERSION = 1
#: the format version of a folder of factors per map (:mod:`.stored`); both are read
MAPS_FORMAT_VERSION = 2


class CurvatureError(ConceptInfluenceError, ValueError):
    """A curvature cannot be fitted, used or loaded; the message says which map, file or examples."""


class Curvature:
    """A curvature approximation ``G`` over a set of linear maps (by :attr:`LinearMap.name`).

    :meth:`precondition` applies the damped inverse ``(G + λI)⁻¹`` map by map to gradients in matrix
    form ``[..., d_out, d_in]``. A subclass registers itself with what it declares (:mod:`.registry`): its
    ``strategies`` and their passes over the data, ``has_eigenbasis`` and ``has_damping``; a fitted one implements
    :meth:`fit`.
    """

    strategies: ClassVar[dict[str, tuple[str, ...] | None]] = {}
    has_eigenbasis: ClassVar[bool] = False
    has_damping: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        registry.register(cls)

    def __init__(
        self,
        strategy: str,
        shapes: dict[str, tuple[int, int]],
        fisher: str | None,
        fingerprint: str | None,
        n_examples: int,
    ) -> None:
        self.strategy = strategy
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.fisher = fisher
        self.fingerprint = fingerprint
        self.n_examples = n_examples

    def check_model(self, adapter) -> None:
        """Raise :class:`CurvatureError` when the curvature was fitted on a model other than ``adapter``'s."""
        _check_fingerprint(self.fingerprint, adapter, "this curvature")

    @property
    def map_names(self) -> list[str]:
        """Names of the maps this curvature covers, in fitting order."""
        return list(self.shapes)

    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(G + λI)⁻¹ V`` for each map's ``V`` ``[..., d_out, d_in]``; same keys, shapes, dtype, device."""
        out = {}
        for name, v in grads.items():
            if name not in self.shapes:
                raise CurvatureError(f"no curvature for map {name!r}; fitted maps: {', '.join(self.shapes)}")
            if v.dim() < 2 or tuple(v.shape[-2:]) != self.shapes[name]:
                raise CurvatureError(f"gradient for {name!r} has shape {tuple(v.shape)}; "
                                     f"expected [..., {self.shapes[name][0]}, {self.shapes[name][1]}]")
            out[name] = self._precondition_map(name, v)
        return out

    # ---- subclass hooks ------------------------------------------------------------------------
    @classmethod
    def fit(cls, strategy: str, fitting) -> "Curvature":
        """Fit ``strategy`` from ``fitting`` (:class:`~concept_influence.curvature.fit.Fitting`: the adapter, maps,
        settings, and the passes over the data, each run on request); run exactly the passes ``strategies`` declares."""
        raise NotImplementedError

    def eigen_weights(self, name: str, sigma: torch.Tensor) -> torch.Tensor:
        """With ``has_eigenbasis``: the weight of each eigen-direction of map ``name`` whose eigenvalue is ``sigma``
        (same shape and dtype), so that preconditioning is ``Q_S [(Q_Sᵀ V Q_A) ⊙ w(Λ)] Q_Aᵀ``."""
        raise NotImplementedError

    def _precondition_map(self, name: str, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _config(self) -> dict:
        """Strategy-specific JSON fields."""
        return {}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def _restore(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Curvature":
        raise NotImplementedError

    def _write(self, directory: Path, per_map: bool | None) -> dict:
        """Write the tensors into ``directory``; return the JSON fields that say how (none: one tensor file)."""
        if per_map:
            raise CurvatureError(f"a {self.strategy} curvature has no factors per map to save one file each")
        save_tensors(directory / TENSOR_FILE, self._tensors(), metadata={"format": FORMAT})
        return {}

    @classmethod
    def _read(cls, directory: Path, config: dict, device: str) -> "Curvature":
        """The curvature of a folder whose JSON is ``config``, its tensors on ``device``."""
        if config.get("format_version") != FORMAT_VERSION:
            raise CurvatureError(f"{directory / CONFIG_FILE}: format version {config.get('format_version')} keeps "
                                 f"factors per map, which a {cls.__name__} has not")
        return cls._restore(config, load_tensors(directory / TENSOR_FILE, CurvatureError, device))

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path, *, per_map: bool | None = None) -> Path:
        """Write the tensors, then ``curvature.json``, into ``directory`` (created if needed): one
        ``curvature.safetensors``, or with ``per_map`` each map's factors in its own file (:mod:`.stored`; None: per
        map when the factors are themselves read from files per map, so saving never holds more than one map's)."""
        directory = Path(directory)
        written = self._write(directory, per_map)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "fingerprint": self.fingerprint,
            "n_examples": self.n_examples,
            "maps": [{"name": n, "shape": list(s)} for n, s in self.shapes.items()],
            **self._config(),
            **written,
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, adapter=None) -> "Curvature":
        """Load a saved curvature. With ``adapter``, refuse factors fitted on a different model (by
        fingerprint) and put the tensors on the adapter's device (else CPU). Tensors are read with
        safetensors only; anything else in their place is refused, never unpickled. Factors saved per map are not
        read now but one map at a time when used (:class:`~.stored.StoredFactors`)."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise CurvatureError(f"{directory}: no {CONFIG_FILE}, so not a saved curvature")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CurvatureError(f"{config_path}: invalid JSON ({e.msg})") from None
        if config.get("format") != FORMAT or config.get("format_version") not in (FORMAT_VERSION, MAPS_FORMAT_VERSION):
            raise CurvatureError(
                f"{config_path}: format {config.get('format')!r} version {config.get('format_version')!r}; "
                f"expected {FORMAT!r} version {FORMAT_VERSION} or {MAPS_FORMAT_VERSION}"
            )
        target = registry.method(config.get("strategy"))
        if target is None:
            raise CurvatureError(f"{config_path}: unknown strategy {config.get('strategy')!r}; known: "
                                 f"{', '.join(registry.STRATEGIES)}")
        if not issubclass(target, cls):
            raise CurvatureError(f"{config_path}: holds a {config['strategy']!r} curvature, not a {cls.__name__}; "
                                 "use Curvature.load")
        if adapter is not None:
            _check_fingerprint(config["fingerprint"], adapter, str(directory))
        return target._read(directory, config, str(adapter.device if adapter is not None else "cpu"))


def _check_fingerprint(fitted_on: str | None, adapter, what: str) -> None:
    current = adapter.fingerprint()
    if fitted_on is not None and fitted_on != current:
        raise CurvatureError(f"{what}: the curvature was fitted on model {fitted_on} but this model's fingerprint is "
                             f"{current}; refit the curvature for this model")


def map_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """The ``{name: (d_out, d_in)}`` of a saved curvature's JSON."""
    return {m["name"]: tuple(m["shape"]) for m in config["maps"]}
