"""File I/O shared by every saved artefact: atomic writes and safetensors-only reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

__all__ = ["atomic_write", "atomic_write_text", "save_tensors", "load_tensors", "load_tensors_and_metadata"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``: readers
    never see half a file, and a failed write (disk full, interrupt) leaves any previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`: a temporary name, then a rename."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path, error: type[Exception] = ValueError, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a truncated file) raises ``error`` naming the file.
    Nothing is ever unpickled."""
    return load_tensors_and_metadata(path, error, device)[0]


def load_tensors_and_metadata(path: str | Path, error: type[Exception] = ValueError,
                              device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and the string metadata of its header (empty if none), in one read;
    errors as :func:`load_tensors`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        with safe_open(path, "pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: not a readable safetensors file ({e}); pickles are refused, never loaded") from None
