"""What the command-line modules (:mod:`.cli`, :mod:`.cli_concept`, :mod:`.cli_sae`, :mod:`.cli_bench`,
:mod:`.cli_index`) share: the ``--dtype`` option, reading chat files for a model, reading a scores file, parsing
``--latents``. Importing it imports no torch."""

from __future__ import annotations

import argparse

__all__ = ["add_dtype_option", "read_examples", "read_scores", "latent_list"]


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--dtype``: what the model computes in (as the run config's ``[model] dtype``)."""
    from .models import MODEL_DTYPES

    p.add_argument("--dtype", choices=("auto", *MODEL_DTYPES), default="auto",
                   help="convert the model's weights on loading (default auto: as saved)")


def read_examples(paths, adapter, max_length: int | None):
    """Tokenised chats of ``paths``; ``max_length`` defaults to the model's context length. Examples whose response
    is cut away are skipped; none left is a ``DataError`` naming the files."""
    from .data import load_chats, tokenize_examples

    chats = [c for p in paths for c in load_chats(p)]
    return tokenize_examples(chats, adapter.tokenizer, max_length or adapter.context_length or 512, skip_truncated=True,
                             source=", ".join(map(str, paths)))


def read_scores(path):
    """The :class:`~concept_influence.scores.Scores` saved at ``path``; an unreadable file is a ``DataError`` naming it."""
    from .data import DataError
    from .scores import Scores

    try:
        return Scores.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read scores ({e})") from None


def latent_list(text: str | None) -> list[int] | None:
    """``--latents I,J,...`` as integers (None when not given); anything else is an ``SAEError`` naming the option."""
    from probes.sae import SAEError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SAEError(f"--latents must be integers separated by commas, got {text!r}") from None
