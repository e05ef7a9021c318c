"""File I/O shared by every saved artefact: atomic writes and safetensors-only reads (one copy, in
:mod:`probes.fileio`, which the concept directions use too) and file hashes."""

from __future__ import annotations

from pathlib import Path

from probes.fileio import atomic_write, atomic_write_text, load_tensors, load_tensors_and_metadata, save_tensors

__all__ = ["atomic_write", "atomic_write_text", "save_tensors", "load_tensors", "load_tensors_and_metadata", "file_sha256",
           "path_sha256", "refuse_same_data"]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (each relative name and SHA-256, in name order), e.g. a
    dataset written by ``Dataset.save_to_disk``."""
    import hashlib

    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def refuse_same_data(a: tuple[str, str], b: tuple[str, str], why: str, error: type[Exception]) -> None:
    """An ``error`` when the two ``(key, path)`` sources hold the same data (equal SHA-256; a missing file is left to
    the reader, which names it)."""
    if Path(a[1]).exists() and Path(b[1]).exists() and path_sha256(a[1]) == path_sha256(b[1]):
        raise error(f"{a[0]} and {b[0]} are the same data ({a[1]} and {b[1]} have equal SHA-256); {why}")
