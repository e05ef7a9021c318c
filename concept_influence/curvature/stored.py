"""Factors per map on disk (issue 27, item 3): a curvature folder whose ``curvature.json`` says ``"storage": "maps"``
keeps each map's eigenbasis in its own safetensors file, ``maps/<map name>.safetensors``, written map by map as each
is finished, and read back one map at a time.

:class:`StoredFactors` is the ``{map name: KroneckerEigen}`` of such a folder: a mapping that reads a map's file at
each access and keeps nothing, so preconditioning a query map by map (:meth:`Curvature.precondition`) streams the
factors and never holds more than one map's. The folder's JSON lists each map's shape, file and mean eigenvalue (the
relative damping is a multiple of it), so a curvature is built from it without reading any factor. Files are read with
safetensors only, never unpickled; a missing or wrong tensor is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..fileio import load_tensors, save_tensors
from .base import FORMAT, CurvatureError
from .core import KroneckerEigen

__all__ = ["StoredFactors", "write_map", "map_file", "read_map_metadata", "basis_from_tensors", "MAPS_DIR", "STORAGE",
           "BASIS_TENSORS"]

MAPS_DIR = "maps"
#: ``curvature.json``'s ``storage`` for a folder of factors per map (absent: one ``curvature.safetensors``)
STORAGE = "maps"
BASIS_TENSORS = ("q_a", "lambda_a", "q_s", "lambda_s")
_HEADER = "concept_influence_map"


def map_file(name: str) -> str:
    """``maps/<name>.safetensors``; a name with characters other than letters, digits, ``._-`` has them replaced and a
    short hash of the name added, so that two names never share a file."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "map"
    if stem != name:
        stem += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{MAPS_DIR}/{stem}.safetensors"


def write_map(directory: str | Path, name: str, basis: KroneckerEigen, with_eigenvalues: bool,
              metadata: Mapping[str, str] | None = None) -> dict:
    """Write one map's factors to ``directory/maps/`` (atomically) and return its ``curvature.json`` entry: name,
    shape, file and mean eigenvalue. ``metadata`` is kept in the file's header beside the map's name and mean."""
    keys = BASIS_TENSORS + (("eigenvalues",) if with_eigenvalues else ())
    mean = float(basis.eigenvalues.mean())
    entry = {"name": name, "shape": [basis.q_s.shape[0], basis.q_a.shape[0]], "file": map_file(name),
             "eigenvalue_mean": mean}
    header = {"format": FORMAT, "map": name, "shape": f"{entry['shape'][0]}x{entry['shape'][1]}",
              "eigenvalue_mean": repr(mean), **(metadata or {})}
    # one key holding sorted JSON: safetensors writes several keys in no fixed order, and equal fits give equal files
    save_tensors(Path(directory) / entry["file"], {k: getattr(basis, k) for k in keys},
                 {_HEADER: json.dumps(header, sort_keys=True)})
    return entry


def read_map_metadata(path: str | Path) -> dict[str, str] | None:
    """The header metadata of a map's file (no tensor is read); None when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            header = json.loads((f.metadata() or {}).get(_HEADER, "null"))
    except (SafetensorError, OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def basis_from_tensors(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, int], with_eigenvalues: bool,
                       prefix: str, where: str) -> KroneckerEigen:
    """Map ``name``'s eigenbasis from ``tensors`` (keys ``<prefix>q_a`` …), each checked against ``shape``
    ``(d_out, d_in)``; a missing or misshapen tensor is a :class:`CurvatureError` naming ``where``."""
    d_out, d_in = shape
    expected = {"q_a": (d_in, d_in), "lambda_a": (d_in,), "q_s": (d_out, d_out), "lambda_s": (d_out,)}
    if with_eigenvalues:
        expected["eigenvalues"] = (d_out, d_in)
    for k, want in expected.items():
        t = tensors.get(f"{prefix}{k}")
        if t is None or tuple(t.shape) != want:
            found = "missing" if t is None else f"shape {tuple(t.shape)}"
            raise CurvatureError(f"{where}: tensor {prefix}{k} of map {name!r} is {found}, expected shape {want}")
    basis = KroneckerEigen.from_eigen(*(tensors[f"{prefix}{k}"] for k in BASIS_TENSORS))
    return basis.with_eigenvalues(tensors[f"{prefix}eigenvalues"]) if with_eigenvalues else basis


class StoredFactors(Mapping[str, KroneckerEigen]):
    """``{map name: KroneckerEigen}`` of a folder of factors per map, each read from its file (onto ``device``) when it
    is looked up and not kept: iterating the items holds one map's factors at a time."""

    def __init__(self, directory: str | Path, entries: list[dict], with_eigenvalues: bool, device: str = "cpu",
                 source: str | None = None) -> None:
        self.directory, self.with_eigenvalues, self.device = Path(directory), with_eigenvalues, device
        where = source or str(self.directory / "curvature.json")
        self._entries: dict[str, dict] = {}
        for e in entries:
            file = e.get("file") if isinstance(e, dict) else None
            ok = (isinstance(file, str) and file.startswith(f"{MAPS_DIR}/") and "/" not in file[len(MAPS_DIR) + 1:]
                  and ".." not in file and isinstance(e.get("name"), str) and isinstance(e.get("shape"), list)
                  and len(e["shape"]) == 2 and isinstance(e.get("eigenvalue_mean"), (int, float)))
            if not ok:
                raise CurvatureError(f"{where}: map entry {e!r} needs a name, a shape [d_out, d_in], a file in "
                                     f"{MAPS_DIR}/ and an eigenvalue_mean")
            self._entries[e["name"]] = e

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (d_out, d_in)}`` of the maps, in order."""
        return {name: tuple(e["shape"]) for name, e in self._entries.items()}

    @property
    def entries(self) -> list[dict]:
        """The ``curvature.json`` entries, in order."""
        return list(self._entries.values())

    def eigenvalue_mean(self, name: str) -> float:
        """The mean eigenvalue of map ``name``, as saved (no factor is read)."""
        return float(self._entries[name]["eigenvalue_mean"])

    def path(self, name: str) -> Path:
        """The file of map ``name``."""
        return self.directory / self._entries[name]["file"]

    def __getitem__(self, name: str) -> KroneckerEigen:
        entry = self._entries[name]  # (a KeyError for an unknown map, as a dict gives)
        path = self.path(name)
        tensors = load_tensors(path, CurvatureError, self.device)
        return basis_from_tensors(tensors, name, tuple(entry["shape"]), self.with_eigenvalues, "", str(path))

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the file)
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"StoredFactors({str(self.directory)!r}, {len(self)} maps)"
