"""The gradient index on disk: a manifest, and per checkpoint the projected spaces and the shards of rows.

::

    INDEX/
      index.json                      manifest: format, settings, maps (name, block, shape, ranks, columns), data,
                                      checkpoints (source, model fingerprint, weight, shard count, when finished)
      checkpoints/NN/spaces.safetensors   each map's projection and its curvature in the projected space
      checkpoints/NN/curvature/       the full curvature (identity projection only)
      checkpoints/NN/shards/shard-000000.safetensors   rows [n, D] of one data shard (ids, input digest in its header)
      checkpoints/NN/empirical.safetensors   the rows' second moment per map (written by the first query that needs it)

A row is one example: the maps' blocks ``scale · vec(P_outᵀ G_z P_in)`` side by side in block order, so the maps
a concept at block ℓ needs are a prefix of the columns. Every file is written atomically; a shard is reused only
when its header names the same input digest, so a build killed at any point resumes at the shard it was writing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import ConceptInfluenceError
from ..fileio import atomic_write_text, load_tensors_and_metadata, save_tensors
from .subspace import MapSpace, spaces_from_tensors, spaces_to_tensors

__all__ = ["GradientIndexError", "IndexStore", "FORMAT", "FORMAT_VERSION", "STORAGE_DTYPES", "BUFFER_BYTES"]

FORMAT = "concept-influence-index"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BUFFER_BYTES = 256 << 20  #: the most a chunk of rows read as float32 may take
_NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}  # bfloat16 is read as its bits


class GradientIndexError(ConceptInfluenceError, RuntimeError):
    """A gradient index cannot be built or queried as asked; the message names the file, map or setting."""


class IndexStore:
    """An index folder: its manifest (``index.json``) and where each file goes."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> "IndexStore":
        """Open an existing index folder (format checked)."""
        path = Path(path)
        file = path / "index.json"
        if not file.is_file():
            raise GradientIndexError(f"{path}: not a gradient index (no index.json); build one with "
                                     "`concept-influence index build`")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GradientIndexError(f"{file}: invalid JSON ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise GradientIndexError(f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                              f"this version reads {FORMAT!r} version {FORMAT_VERSION}")
        return cls(path, manifest)

    def save_manifest(self) -> None:
        """Write ``index.json`` (atomically)."""
        atomic_write_text(self.path / "index.json", json.dumps(self.manifest, indent=1) + "\n")

    # ---- layout --------------------------------------------------------------------------------
    def checkpoint_dir(self, c: int) -> Path:
        return self.path / "checkpoints" / f"{c:02d}"

    def shard_path(self, c: int, index: int) -> Path:
        return self.checkpoint_dir(c) / "shards" / f"shard-{index:06d}.safetensors"

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the rows."""
        return STORAGE_DTYPES[self.manifest["settings"]["dtype"]]

    @property
    def dim(self) -> int:
        """The width of a row (all maps)."""
        return sum(m["dim"] for m in self.manifest["maps"])

    # ---- spaces --------------------------------------------------------------------------------
    def save_spaces(self, c: int, spaces: list[MapSpace]) -> None:
        tensors, metadata = spaces_to_tensors(spaces)
        save_tensors(self.checkpoint_dir(c) / "spaces.safetensors", tensors, metadata)

    def load_spaces(self, c: int) -> list[MapSpace]:
        tensors, metadata = load_tensors_and_metadata(self.checkpoint_dir(c) / "spaces.safetensors", GradientIndexError)
        return spaces_from_tensors(tensors, metadata)

    # ---- shards --------------------------------------------------------------------------------
    def write_shard(self, c: int, index: int, rows: torch.Tensor, ids: list[str], digest: str, n_lines: int) -> Path:
        """Save one shard's rows ``[n, D]`` (in the storage dtype) with its ids and input digest, atomically."""
        # one metadata key: safetensors writes several in no fixed order, and a rebuilt shard must be the same bytes
        meta = {"shard": json.dumps({"digest": digest, "n_lines": n_lines, "index": index, "ids": ids})}
        return save_tensors(self.shard_path(c, index), {"rows": rows.to(self.dtype)}, meta)

    def shard_header(self, c: int, index: int) -> dict | None:
        """The metadata of a finished shard (digest, n_lines, index, ids), or None when it is missing or unreadable (a
        resumed build computes it again); a file that is shorter than its header says is unreadable."""
        path = self.shard_path(c, index)
        try:
            header, offset = _header(path)
        except (OSError, ValueError):
            return None
        info = header.get("rows", {})
        end = info.get("data_offsets", [0, 0])[1]
        if path.stat().st_size < offset + end:
            return None
        try:
            return json.loads(header["__metadata__"]["shard"])
        except (KeyError, ValueError):
            return None

    def rows(self, c: int, index: int, columns: int | None = None) -> tuple[list[str], np.ndarray]:
        """A shard's ids and rows ``[n, D]`` (its first ``columns`` columns when given) as a copy-on-write memory map
        (the file is never written); a missing, truncated or corrupt shard is a :class:`GradientIndexError` naming
        the file."""
        path = self.shard_path(c, index)
        try:
            header, offset = _header(path)
            info = header["rows"]
            begin, end = info["data_offsets"]
            n, width = info["shape"]
            if path.stat().st_size < offset + end or end - begin != n * width * np.dtype(_NUMPY[info["dtype"]]).itemsize:
                raise ValueError(f"the file has {path.stat().st_size} bytes, its header describes {offset + end}")
            ids = json.loads(header["__metadata__"]["shard"])["ids"]
        except (OSError, ValueError, KeyError) as e:
            raise GradientIndexError(f"{path}: truncated or unreadable shard ({e}); run `concept-influence index build` "
                              "again to recompute it") from None
        data = np.memmap(path, dtype=_NUMPY[info["dtype"]], mode="c", offset=offset + begin, shape=(n, width))
        return ids, data if columns is None else data[:, :columns]

    def iter_rows(self, c: int, columns: int, chunk: int = 1024) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Every shard of checkpoint ``c`` in data order as ``(ids, rows)`` chunks of at most ``chunk`` rows (the first
        ``columns`` columns) in float32, fewer when such a chunk would pass :data:`BUFFER_BYTES` (wide rows: an
        uncompressed or high-rank index). The rows are one reused buffer: use each chunk before asking for the next."""
        chunk = max(1, min(chunk, BUFFER_BYTES // (4 * max(columns, 1))))
        buffer = torch.empty(chunk, columns)
        for index in range(self.manifest["checkpoints"][c]["n_shards"]):
            ids, data = self.rows(c, index, columns)
            source = torch.from_numpy(data)
            if source.dtype == torch.uint16:
                source = source.view(torch.bfloat16)
            for start in range(0, len(ids), chunk):
                part = source[start:start + chunk]
                rows = buffer[:len(part)]
                rows.copy_(part)  # converting into a reused buffer is several times faster than a new tensor each time
                yield ids[start:start + chunk], rows


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset of its data."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 1 << 30:
            raise ValueError("not a safetensors file")
        raw = fh.read(size)
    if len(raw) != size:
        raise ValueError("the header is cut short")
    return json.loads(raw), 8 + size
