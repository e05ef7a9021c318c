"""Concept directions: a vector in the residual stream (or any hook) with its provenance.

A :class:`ConceptDirection` is what every concept function and estimator reads: the vector, the
TransformerLens hook name where it lives, the block index ``layer`` (the last block whose output the
hook depends on), the ``kind`` of method that produced it, and a JSON ``metadata`` dict.

On disk a direction is two files: ``<name>.safetensors`` (one tensor, ``"vector"``) and a sidecar
``<name>.json`` with the hook, layer, kind, metadata and format version. Loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConceptInfluenceError
from .fileio import atomic_write_text, load_tensors, save_tensors
from .hooks import block_of_hook

__all__ = ["DirectionError", "ConceptDirection", "DIRECTION_KINDS", "load_persona_vector"]

DIRECTION_KINDS = ("logistic", "diff_means", "persona_vector", "sae_decoder", "sae_encoder", "custom")
_FORMAT = "probes.ConceptDirection"  # the sidecar's format tag
# Files written before probes became the lower package carry the project's package name in front of the same
# class name; any "<package>.ConceptDirection" tag is read.
_FORMAT_SUFFIX = ".ConceptDirection"
_FORMAT_VERSION = 1


class DirectionError(ConceptInfluenceError, ValueError):
    """A concept direction is invalid, does not fit a model, or cannot be read; the message says why."""


def _sidecar(path: Path) -> Path:
    if path.suffix == ".json":
        raise DirectionError(
            f"{path}: a direction is saved as a tensor file plus a .json sidecar; use a name ending in .safetensors"
        )
    return path.with_suffix(".json")


@dataclass
class ConceptDirection:
    """A concept direction ``vector`` (1-D float32) at ``hook_name``.

    ``layer`` defaults to the block index in ``blocks.{l}.…``; hooks outside the blocks (e.g.
    ``hook_embed``) need it explicitly (``-1`` for hooks before the first block).
    """

    vector: torch.Tensor
    hook_name: str
    layer: int | None = None
    kind: str = "custom"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vector = torch.as_tensor(self.vector).detach().to("cpu", torch.float32).clone()
        if self.vector.ndim != 1:
            raise DirectionError(
                f"a concept direction must be a 1-D vector; got shape {tuple(self.vector.shape)} for hook {self.hook_name!r}"
            )
        if not torch.isfinite(self.vector).all():
            bad = int((~torch.isfinite(self.vector)).sum())
            raise DirectionError(f"the direction for hook {self.hook_name!r} has {bad} non-finite entries (NaN or inf)")
        if float(self.vector.norm()) == 0.0:
            raise DirectionError(f"zero direction for hook {self.hook_name!r}: the vector has norm 0")
        if self.kind not in DIRECTION_KINDS:
            raise DirectionError(f"unknown direction kind {self.kind!r}; expected one of {DIRECTION_KINDS}")
        block = block_of_hook(self.hook_name)
        if self.layer is None:
            if block is None:
                raise DirectionError(
                    f"cannot infer the layer of hook {self.hook_name!r}; pass layer= (the last block the hook "
                    "depends on, -1 before the first block)"
                )
            self.layer = block
        elif block is not None and self.layer != block:
            raise DirectionError(f"layer={self.layer} contradicts hook {self.hook_name!r} (block {block})")
        if self.layer < -1:
            raise DirectionError(f"layer must be >= -1, got {self.layer}")

    @property
    def unit(self) -> torch.Tensor:
        """The unit vector ``v / ‖v‖``."""
        return self.vector / self.vector.norm()

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, tensor ``"vector"``) and the JSON sidecar ``path`` with suffix
        ``.json``, each atomically. Returns ``path``."""
        path = Path(path)
        sidecar = _sidecar(path)
        header = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "hook_name": self.hook_name,
            "layer": self.layer,
            "kind": self.kind,
            "d_model": self.vector.numel(),
            "metadata": self.metadata,
        }
        try:
            text = json.dumps(header, indent=2, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise DirectionError(f"the metadata of this direction cannot be written as JSON ({e})") from None
        save_tensors(path, {"vector": self.vector})
        atomic_write_text(sidecar, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ConceptDirection":
        """Read a direction written by :meth:`save`. Only safetensors is read: a pickle (``torch.save``)
        file is refused."""
        path = Path(path)
        sidecar = _sidecar(path)
        try:
            tensors = load_tensors(path, DirectionError)
        except DirectionError as e:
            raise DirectionError(f"{e}. A persona-vector file saved with torch.save is read by load_persona_vector") from None
        if "vector" not in tensors:
            raise DirectionError(f"{path}: no tensor named 'vector' (found {sorted(tensors)})")
        if not sidecar.is_file():
            raise DirectionError(f"{path}: the sidecar {sidecar.name} with the hook name and metadata is missing")
        try:
            header = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DirectionError(f"{sidecar}: invalid JSON ({e})") from None
        if not isinstance(header, dict) or not str(header.get("format", "")).endswith(_FORMAT_SUFFIX):
            raise DirectionError(f"{sidecar}: not a concept-direction sidecar")
        if header.get("format_version") != _FORMAT_VERSION:
            raise DirectionError(
                f"{sidecar}: format version {header.get('format_version')} is not supported (this code reads {_FORMAT_VERSION})"
            )
        return cls(tensors["vector"], header["hook_name"], header["layer"], header["kind"], header["metadata"])


def _read_tensor_file(path: Path) -> tuple[torch.Tensor, dict]:
    if path.suffix == ".safetensors":
        tensors = load_tensors(path, DirectionError)
        if not tensors:
            raise DirectionError(f"{path}: the file holds no tensor")
        key = next(iter(tensors))
        return tensors[key], {"tensor_key": key}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError for unreadable files
        raise DirectionError(f"{path}: cannot read as a tensor with torch.load(weights_only=True) ({e})") from None
    if not isinstance(obj, torch.Tensor):
        raise DirectionError(
            f"{path}: expected a tensor of shape [n_layers+1, d_model], found a {type(obj).__name__}"
        )
    return obj, {}


def load_persona_vector(
    path: str | Path, layer: int, hook_template: str = "blocks.{block}.hook_resid_post"
) -> ConceptDirection:
    """One layer of a persona-vector file as a :class:`ConceptDirection` (kind ``"persona_vector"``).

    Persona-vector files (safety-research/persona_vectors, ``generate_vec.py``) hold a tensor
    ``[n_layers+1, d_model]`` of response-averaged differences of means, saved with ``torch.save``.
    Row ``L`` comes from Hugging Face ``hidden_states[L]``: row 0 is the embedding output
    (``blocks.0.hook_resid_pre``) and row ``L >= 1`` is the output of block ``L-1``
    (``hook_template`` with ``block=L-1``, default ``blocks.{L-1}.hook_resid_post``). This matches the
    repository's steering code, which adds row ``L`` at the output of decoder layer ``L-1``.
    ``.pt`` files are read with ``torch.load(weights_only=True)``; ``.safetensors`` files use their
    first tensor. ``layer`` is the row index ``L``.
    """
    path = Path(path)
    if not path.is_file():
        raise DirectionError(f"{path}: no such persona-vector file")
    if "{block}" not in hook_template:
        raise DirectionError(f"hook_template must contain '{{block}}', got {hook_template!r}")
    tensor, extra = _read_tensor_file(path)
    if tensor.ndim != 2:
        raise DirectionError(
            f"{path}: a persona-vector file holds a [n_layers+1, d_model] tensor, got shape {tuple(tensor.shape)}"
        )
    n_rows = tensor.shape[0]
    if not 0 <= layer < n_rows:
        raise DirectionError(
            f"layer {layer} is out of range for {path.name}: valid rows are 0..{n_rows - 1} "
            f"(0 = embeddings, L = output of block L-1)"
        )
    hook = "blocks.0.hook_resid_pre" if layer == 0 else hook_template.format(block=layer - 1)
    metadata = {"source": str(path), "hidden_states_index": layer, "n_rows": n_rows, **extra}
    try:
        return ConceptDirection(tensor[layer], hook, max(layer - 1, 0), "persona_vector", metadata)
    except DirectionError as e:
        raise DirectionError(f"{path}, row {layer}: {e}") from None
