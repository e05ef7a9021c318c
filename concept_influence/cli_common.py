"""What the command-line modules (:mod:`.cli`, :mod:`.cli_concept`, :mod:`.cli_sae`, :mod:`.cli_bench`,
:mod:`.cli_index`) share: options generated from settings dataclasses, the ``--dtype`` option, the medical data's
default folder, reading chat files for a model, reading a scores file, the ``bench ...-table`` commands that merge
runs' JSON files into one markdown table, and the guard of the ``bench`` commands that need the benchmarks package."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
from pathlib import Path

__all__ = ["EM_DATA", "add_settings_options", "given_settings", "add_dtype_option", "read_examples", "read_scores",
           "named_json", "write_table",
           "add_table_command", "needs_benchmarks"]

EM_DATA = "../shared/data/em"  # the default folder of the emergent-misalignment data (bench medical, bench index --part)


def add_settings_options(p: argparse.ArgumentParser, cls: type, names: tuple[str, ...] | None = None) -> None:
    """``--name`` for each field of the settings class ``cls`` (or those in ``names``), with the field's help text and
    choices; a list field takes several values. An option not given is absent from the parsed namespace, so that
    :func:`given_settings` returns only what the user gave (the defaults are the settings' own, or a run's)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kinds = [h for h in typing.get_args(hints[f.name]) or (hints[f.name],) if h is not type(None)]
        item = typing.get_args(kinds[0])[0] if typing.get_origin(kinds[0]) is list else None
        default = "" if f.default in (None, dataclasses.MISSING) else f" (default {f.default})"
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                       choices=f.metadata.get("choices"), nargs="+" if item else None, type=item or kinds[0],
                       help=f.metadata.get("help", "") + default)


def given_settings(args: argparse.Namespace, cls: type, names: tuple[str, ...] | None = None) -> dict:
    """The fields of ``cls`` (or those in ``names``) the user gave as options (:func:`add_settings_options`)."""
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if (names is None or f.name in names) and hasattr(args, f.name)}


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--dtype``: what the model computes in (as the run config's ``[model] dtype``)."""
    from .models import MODEL_DTYPES

    p.add_argument("--dtype", choices=("auto", *MODEL_DTYPES), default="auto",
                   help="convert the model's weights on loading (default auto: as saved)")


def read_examples(paths, adapter, max_length: int | None):
    """Tokenised chats of ``paths``; ``max_length`` defaults to the model's context length. Examples whose response
    is cut away are skipped; none left is a ``DataError`` naming the files."""
    from .data import read_tokenized

    return read_tokenized(paths, adapter.tokenizer, max_length or adapter.context_length or 512)


def read_scores(path):
    """The :class:`~concept_influence.scores.Scores` saved at ``path``; an unreadable file is a ``DataError`` naming it."""
    from .data import DataError
    from .scores import Scores

    try:
        return Scores.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read scores ({e})") from None


def named_json(items: list[str], what: str) -> dict[str, tuple[Path, dict]]:
    """``[NAME=]PATH`` arguments as ``{name: (path, its JSON)}``; the name defaults to the file's folder."""
    from .data import DataError

    out = {}
    for item in items:
        name, _, path = item.rpartition("=")
        try:
            out[name or Path(path).parent.name] = Path(path), json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read {what} ({e})") from None
    return out


def write_table(args: argparse.Namespace, title: str, explanation: str, table: str) -> int:
    """``args.out``: the table under its title, the command that made it and what it shows; also printed."""
    from .fileio import atomic_write_text

    text = (f"# {title}\n\nCommand: `concept-influence bench {args.table_command} {' '.join(args.files)} --out {args.out}`"
            f"\n\n{explanation}\n\n{table}\n")
    atomic_write_text(args.out, text)
    print(text)
    return 0


def add_table_command(bench, name: str, func, files: str, help: str, description: str) -> argparse.ArgumentParser:
    """``bench NAME [NAME=]PATH ... --out FILE``: one markdown table from several benchmark runs' JSON files."""
    p = bench.add_parser(name, help=help, description=description)
    p.add_argument("files", nargs="+", metavar="[NAME=]PATH", help=f"{files} files, optionally named")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.set_defaults(func=func, table_command=name)
    return p


def needs_benchmarks(command):
    """``command`` (a ``bench`` command that imports ``concept_influence_benchmarks``), first checking that the
    benchmarks are installed: the wheel leaves them out, the dev extra's editable install has them. Where they are
    missing, a :class:`~concept_influence.errors.ConceptInfluenceError` says so in one line."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        if importlib.util.find_spec("concept_influence_benchmarks") is None:
            from .errors import ConceptInfluenceError

            raise ConceptInfluenceError(
                f"`concept-influence bench {args.benchmark}` needs the benchmarks, which the wheel leaves out: install "
                'the dev extra from a clone of the repository (`pip install -e ".[dev]"`, or `make install`)')
        return command(args)

    return run
