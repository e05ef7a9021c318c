"""Every error of the toolkit that describes bad input subclasses :class:`ConceptInfluenceError`, keeps its builtin
base (``except ValueError`` still catches a ``ConfigError``), and reaches the user of the command line as one line
``concept-influence: error: <message>`` with exit status 2, never as a traceback: each subclass found by importing
every module of ``concept_influence`` and ``probes`` is raised through the CLI's entry point."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import concept_influence
import probes
from concept_influence import ConceptInfluenceError
from concept_influence.cli import main
from concept_influence.errors import ConceptInfluenceError as FromErrors

# the errors of the toolkit and the builtin base each keeps (what callers catch today)
KNOWN = {
    "ConfigError": ValueError, "FilterError": ValueError, "HookError": KeyError, "ModelLoadError": ValueError,
    "ConceptCheckError": ValueError, "DataError": ValueError, "ScoringError": RuntimeError, "CurvatureError": ValueError,
    "BenchmarkError": ValueError, "GradientIndexError": RuntimeError, "RunError": RuntimeError,
    "ConceptError": ValueError, "GenerationError": RuntimeError, "DirectionError": ValueError, "SAEError": ValueError,
}


def _all_modules_imported() -> None:
    for package in (probes, concept_influence):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] != "__main__":  # python -m concept_influence: runs the CLI
                importlib.import_module(info.name)


def _exceptions_defined_in_the_packages() -> list[type]:
    """Every public exception class defined in a module of ``concept_influence`` or ``probes``."""
    found = set()
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("concept_influence", "probes"):
            found |= {v for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, Exception)
                      and not k.startswith("_") and v.__module__ == name}
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


_all_modules_imported()
ERRORS = sorted(set(_subclasses(ConceptInfluenceError)), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_the_walk_finds_every_error_of_the_toolkit_with_its_builtin_base():
    assert FromErrors is ConceptInfluenceError is probes.errors.ConceptInfluenceError
    assert "ConceptInfluenceError" in concept_influence.__all__
    by_name = {c.__name__: c for c in ERRORS}
    assert set(KNOWN) <= set(by_name), sorted(set(KNOWN) - set(by_name))
    for name, base in KNOWN.items():
        assert issubclass(by_name[name], base), name


def test_every_error_class_of_the_packages_is_a_concept_influence_error():
    """A new error class must subclass ConceptInfluenceError (with its builtin base), or the CLI shows a traceback."""
    outside = [f"{c.__module__}.{c.__qualname__}" for c in _exceptions_defined_in_the_packages()
               if not issubclass(c, ConceptInfluenceError)]
    assert not outside, outside


@pytest.mark.parametrize("error", ERRORS, ids=lambda c: c.__qualname__)
def test_every_error_reaches_the_command_line_as_one_line(error, monkeypatch, capsys, tmp_path):
    message = f"{error.__name__}: what went wrong and where ({tmp_path / 'file.jsonl'})"

    def raises(args):
        raise error(message)

    monkeypatch.setattr("concept_influence.cli._run", raises)  # `concept-influence run CONFIG` calls it
    assert main(["run", str(tmp_path / "run.toml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"concept-influence: error: {message}"]


def test_an_error_that_is_not_the_toolkits_is_a_bug_and_propagates(monkeypatch):
    def raises(args):
        raise ValueError("a bug")

    monkeypatch.setattr("concept_influence.cli._run", raises)
    with pytest.raises(ValueError, match="a bug"):
        main(["run", "run.toml"])


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    """The real process: a missing run config is a ``ConfigError``, printed as one line on stderr, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "concept_influence", "run", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("concept-influence: error: ") and "missing.toml" in lines[0], lines
