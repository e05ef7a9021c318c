"""MkDocs hook: pages generated at build time, so that they stay true to the code.

- ``reference/cli.md``: the ``--help`` of every ``concept-influence`` command, from the argparse parser itself
  (:func:`concept_influence.cli.build_parser`);
- ``reference/api/<module>.md``: one mkdocstrings page (``::: module``) per public module of ``concept_influence`` and
  ``probes``, found on disk, so a module added or renamed appears without editing the docs; the "API reference"
  section of the navigation is filled with them.

The docstrings are prose with reStructuredText roles (``:func:`x```), which Markdown renders as ``:func:`` followed by
code: the role is dropped from the API pages (and the ``~`` of a short reference).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("concept_influence", "probes")
# Not part of the library's API: the command-line modules (documented by reference/cli.md) and the entry point. (The
# benchmarks are a package of their own, concept_influence_benchmarks, documented by the Benchmarks page.)
SKIP = ("concept_influence.__main__", "concept_influence.cli")
API_SECTION = "API reference"


def api_modules() -> list[str]:
    """The packages and their direct public submodules and subpackages, by file name (nothing is imported)."""
    names = []
    for package in PACKAGES:
        names.append(package)
        for path in sorted((ROOT / package).iterdir()):
            stem = path.stem if path.suffix == ".py" else path.name
            if stem.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").is_file()):
                continue
            name = f"{package}.{stem}"
            if not any(name == s or name.startswith(s + "_") or name.startswith(s + ".") for s in SKIP):
                names.append(name)
    return names


def _api_page(name: str) -> str:
    return f"reference/api/{name}.md"


def on_config(config, **kwargs):
    """Fill the navigation's API section with one page per module."""
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and API_SECTION in entry:
            entry[API_SECTION] = ["reference/api/index.md"] + [{name: _api_page(name)} for name in api_modules()]
    return config


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _cli_sections(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for name, child in _subcommands(parser):
        yield from _cli_sections(child, path + (name,))


def cli_page() -> str:
    os.environ["COLUMNS"] = "110"  # argparse wraps its help to the terminal's width: make it fixed
    if str(ROOT) not in sys.path:  # the package of this tree, as mkdocstrings reads it (paths: [.])
        sys.path.insert(0, str(ROOT))
    from concept_influence.cli import build_parser

    lines = ["# Command-line reference", "",
             "Generated at build time from the argparse parser (`concept_influence.cli.build_parser`): each "
             "section is the command's own `--help`.", ""]
    for path, parser in _cli_sections(build_parser()):
        title = " ".join(("concept-influence",) + path)
        depth = min(len(path) + 1, 4)
        lines += ["#" * (depth + 1) + f" `{title}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def api_index() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings with mkdocstrings: one page per package and module of `concept_influence` "
             "and of `probes` (the layer below it, which never imports `concept_influence`). The entry points most "
             "scripts need:", "",
             "- models: [`concept_influence.models`](concept_influence.models.md) (`as_adapter`, `load_model`);",
             "- data: [`concept_influence.data`](concept_influence.data.md) (`load_chats`, `tokenize_examples`);",
             "- concepts: [`concept_influence.concepts`](concept_influence.concepts.md) (`ConceptFunction`), "
             "[`probes`](probes.md) (probes and directions);",
             "- estimators: [`concept_influence.estimators`](concept_influence.estimators.md) (`ConceptInfluence`, "
             "`ProbeProjection`, `OverCheckpoints`, ...);",
             "- curvature: [`concept_influence.curvature`](concept_influence.curvature.md) (`fit_curvature`, "
             "`CurvatureSettings`);",
             "- the gradient index: [`concept_influence.index`](concept_influence.index.md) (`GradientIndex`);",
             "- run folders: [`concept_influence.runs`](concept_influence.runs.md) and "
             "[`concept_influence.config`](concept_influence.config.md).", "",
             "Every module:", ""]
    lines += [f"- [`{name}`]({name}.md)" for name in api_modules()]
    return "\n".join(lines) + "\n"


ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const):(<code>)~?")


def on_page_content(html, page, **kwargs):
    if page.file.src_uri.startswith("reference/api/"):
        return ROLE.sub(r"\1", html)
    return html


def on_files(files, config, **kwargs):
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    files.append(File.generated(config, "reference/api/index.md", content=api_index()))
    for name in api_modules():
        files.append(File.generated(config, _api_page(name), content=f"# `{name}`\n\n::: {name}\n"))
    return files
