"""SAE latents as concept directions (SAE-Lens 6.x).

A latent ``i`` gives two directions at the SAE's hook: the decoder row ``W_dec[i]`` (what the latent
writes into the residual stream) and the encoder column ``W_enc[:, i]`` (what it reads). SAE-Lens stores
``W_enc`` as ``[d_in, d_sae]`` and ``W_dec`` as ``[d_sae, d_in]``; the hook name is
``sae.cfg.metadata.hook_name`` (transcoders write to ``metadata.hook_name_out``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .directions import ConceptDirection, DirectionError

__all__ = ["SAEError", "load_sae", "load_pretrained_sae", "sae_direction", "sae_hooks", "check_latents"]

_CFG_FILE = "cfg.json"
_WEIGHTS_FILE = "sae_weights.safetensors"


class SAEError(DirectionError):
    """An SAE cannot be loaded, has no such latent, or does not fit a model."""


def load_sae(path: str | Path, device: str = "cpu"):
    """Load an SAE saved with ``sae.save_model(path)`` (a folder with ``cfg.json`` and
    ``sae_weights.safetensors``) through ``SAE.load_from_disk``; the folder is recorded in
    ``sae.cfg.metadata.loaded_from`` (and so in the provenance of its directions)."""
    from sae_lens import SAE

    path = Path(path)
    if not path.is_dir():
        raise SAEError(f"{path}: no such SAE folder")
    missing = [name for name in (_CFG_FILE, _WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise SAEError(f"{path}: not an SAE-Lens folder, missing {' and '.join(missing)}")
    sae = SAE.load_from_disk(path, device=device)
    sae.cfg.metadata.loaded_from = str(path)
    return sae


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu"):
    """Load a released SAE with ``SAE.from_pretrained(release, sae_id)`` (e.g. ``"gpt2-small-res-jb"``,
    ``"blocks.8.hook_resid_pre"``). Needs the Hugging Face Hub or a local cache; without them, or for an
    unknown release or id, raises :class:`SAEError` with SAE-Lens's reason. ``"release/sae_id"`` is
    recorded in ``sae.cfg.metadata.loaded_from``."""
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except OSError as e:  # huggingface_hub's errors when offline or the files are not cached
        raise SAEError(
            f"cannot fetch SAE {sae_id!r} of release {release!r}: no access to the Hugging Face Hub and not in "
            f"the local cache ({e})"
        ) from e
    except ValueError as e:  # unknown release or SAE id; SAE-Lens lists the valid ones
        raise SAEError(f"cannot load SAE {sae_id!r} of release {release!r}: {e}") from e
    sae.cfg.metadata.loaded_from = f"{release}/{sae_id}"
    return sae


def sae_hooks(sae) -> tuple[str | None, str | None]:
    """The hooks the SAE reads from and writes to (the same one unless it is a transcoder)."""
    meta = sae.cfg.metadata
    return meta.hook_name, meta.hook_name_out or meta.hook_name


def check_latents(sae, latents: Sequence[int]) -> list[int]:
    """The latent indices as ints; :class:`SAEError` names the first one outside ``0..d_sae-1``."""
    d_sae = sae.cfg.d_sae
    out = []
    for i in latents:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise SAEError(f"latent indices must be integers, got {i!r}")
        if not 0 <= int(i) < d_sae:
            raise SAEError(f"latent {int(i)} is out of range: the SAE has latents 0..{d_sae - 1}")
        out.append(int(i))
    return out


def sae_direction(sae, latent: int, which: str = "decoder", hook_name: str | None = None) -> ConceptDirection:
    """Latent ``latent`` of ``sae`` as a direction: its decoder row (``which="decoder"``, kind
    ``"sae_decoder"``) or encoder column (``"encoder"``, kind ``"sae_encoder"``). ``hook_name``
    overrides the hook recorded in the SAE's config."""
    if which not in ("decoder", "encoder"):
        raise ValueError(f"which must be 'decoder' or 'encoder', got {which!r}")
    (latent,) = check_latents(sae, [latent])
    d_sae = sae.cfg.d_sae
    read_hook, write_hook = sae_hooks(sae)
    sae_hook = write_hook if which == "decoder" else read_hook
    hook = hook_name or sae_hook
    if hook is None:
        raise SAEError("the SAE's config records no hook name (cfg.metadata.hook_name); pass hook_name=")
    vector = sae.W_dec[latent] if which == "decoder" else sae.W_enc[:, latent]
    meta = sae.cfg.metadata
    metadata = {
        "latent": latent,
        "which": which,
        "d_sae": d_sae,
        "sae_hook_name": sae_hook,
        "architecture": sae.cfg.architecture(),
        "normalize_activations": sae.cfg.normalize_activations,
        "model_name": meta.model_name,
        "source": meta.loaded_from,
    }
    return ConceptDirection(vector, hook, kind=f"sae_{which}", metadata=metadata)
