"""Where a result came from: package versions, Python, the machine, the command, and digests of the inputs.

Run folders record :func:`package_versions` and :func:`invocation` for every stage; the benchmarks record
:func:`machine_description`. Model fingerprints come from :meth:`ModelAdapter.fingerprint`, file digests from
:func:`concept_influence.fileio.file_sha256`, and :func:`combine_digests` folds a list of digests into one.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib import metadata
from typing import Sequence

__all__ = ["PACKAGES", "package_version", "package_versions", "machine_description", "invocation",
           "combine_digests"]

#: The packages a result depends on, recorded in every run folder.
PACKAGES = ("concept-influence", "torch", "transformer-lens", "sae-lens", "transformers", "scikit-learn", "numpy",
            "safetensors", "tokenizers")


def package_version(name: str) -> str | None:
    """The installed version of the distribution ``name``; None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python and the versions of ``names`` (``"not installed"`` for a missing one)."""
    return {"python": platform.python_version(), **{n: package_version(n) or "not installed" for n in names}}


def machine_description() -> dict:
    """CPU model (``/proc/cpuinfo``), core counts, torch version and threads, library versions, load."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "transformers": package_version("transformers"),
        "transformer_lens": package_version("transformer-lens"),
        "kronfluence": package_version("kronfluence"),
        "bergson": package_version("bergson"),
        "load_average_start": list(os.getloadavg()),
    }


def invocation() -> str:
    """The command this process was started with, as one line."""
    return " ".join(sys.argv)


def combine_digests(digests: Sequence[str]) -> str:
    """One SHA-256 for an ordered list of hex digests (e.g. the shards read so far)."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()
