"""The shape of the code: the wheel ships the library without the benchmarks, which the dev install has; no module
imports another that imports it back; the library never imports the benchmarks but for the ``bench`` commands that
run them; without them the demo's command line still works; and the config walk seldom climbs back up."""

import ast
import inspect
import itertools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import networkx  # (a dependency of torch)

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("concept_influence", "probes")
BENCHMARKS = "concept_influence_benchmarks"


def _built(tmp_path: Path, hook: str) -> zipfile.ZipFile:
    """The wheel that setuptools' ``hook`` (``build_wheel`` or ``build_editable``) builds from a copy of the project
    (so that the build leaves nothing in the checkout)."""
    project = tmp_path / "project"
    for package in (*LIBRARY, BENCHMARKS):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, project / name)
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(tmp_path / 'dist')!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return zipfile.ZipFile(tmp_path / "dist" / done.stdout.split()[-1])


def test_the_wheel_ships_the_library_and_the_demo_without_the_benchmarks(tmp_path):
    names = set(_built(tmp_path, "build_wheel").namelist())
    assert not [n for n in names if n.startswith(BENCHMARKS)]
    for module in ("concept_influence/cli.py", "concept_influence/demo.py", "concept_influence/planted/experiment.py",
                   "concept_influence/toy/demo_corpus.py", "concept_influence/toy/small_model.py", "probes/__init__.py"):
        assert module in names, module


def test_the_editable_install_also_has_the_benchmarks(tmp_path):
    wheel = _built(tmp_path, "build_editable")
    top_level = next(n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["concept_influence", BENCHMARKS, "probes"]


def _modules() -> dict[str, Path]:
    """Every module of the library and the benchmarks by its dotted name (a package by its own name)."""
    out = {}
    for package in (*LIBRARY, BENCHMARKS):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules) -> dict[str, bool]:
    """The modules of ``modules`` that ``name`` imports, each with whether it does so at module level (not deferred
    into a function); ``from package import module`` names the module, relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found[target] = found.get(target, False) or id(node) in top
    return found


def test_no_module_imports_another_that_imports_it_back():
    modules = _modules()
    graph = networkx.DiGraph([(name, target) for name, path in modules.items() for target in _imports(name, path, modules)])
    circles = [sorted(c) for c in networkx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles


def test_the_library_imports_the_benchmarks_only_in_the_bench_commands():
    """No library module imports the benchmarks when it is imported; the command-line modules do inside the ``bench``
    commands, which check first that they are installed (cli_common.needs_benchmarks)."""
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name.split(".")[0] not in LIBRARY:
            continue
        for target, at_module_level in _imports(name, path, modules).items():
            if target.split(".")[0] == BENCHMARKS and (at_module_level or not name.startswith("concept_influence.cli")):
                offenders.append(f"{name} -> {target}")
    assert not offenders


def test_without_the_benchmarks_the_parser_builds_and_a_bench_command_says_what_to_install():
    code = ("import sys; sys.modules['concept_influence_benchmarks'] = None\n"
            "import concept_influence.demo\n"
            "from concept_influence.cli import build_parser, main\n"
            "build_parser()\n"
            "sys.exit(main(['bench', 'memory', '--out', 'unused']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "concept-influence: error:" in done.stderr and "[dev]" in done.stderr


def _package(module: str) -> str:
    """The package ``module`` belongs to: itself for a package (its ``__init__``), else its parent."""
    return module if hasattr(sys.modules.get(module), "__path__") else module.rpartition(".")[0]


def _config_walk(root: Path) -> list[tuple[str, str, str, str]]:
    """Every call, in order, from a function of one ``concept_influence`` module into a function of another while
    ``RunConfig.read`` reads the project's config and ``run_stages((), ...)`` checks its memory plan, joins the
    process group, creates the run folder, builds the :class:`Pipeline` and checks its inputs (no stage runs), as
    ``(caller module, caller, callee module, callee)``."""
    from runfolder import make_project

    from concept_influence.config import RunConfig
    from concept_influence.runs import run_stages

    project = make_project(root)
    text = (project / "run.toml").read_text()
    (project / "run.toml").write_text(text.replace('path = "model"', 'path = "model"\ndevice = "cpu"\n'
                                                   'device_memory = "1TiB"'))  # a size: the memory plan is made
    walk, entered = [], set()

    def record(frame, event, arg) -> None:
        callee = frame.f_globals.get("__name__", "")
        if event != "call" or not callee.startswith("concept_influence."):
            return
        if frame.f_code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
            if frame in entered:  # a generator resumed: not a new call
                return
            entered.add(frame)
        caller = frame.f_back  # the nearest concept_influence frame: a call made through the standard library
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("concept_influence."):
            caller = caller.f_back  # (dataclasses.replace, contextlib) is that function's call
        if caller is not None and caller.f_globals["__name__"] != callee:
            walk.append((caller.f_globals["__name__"], caller.f_code.co_qualname, callee, frame.f_code.co_qualname))

    for out, traced in (("warm-up", False), ("run", True)):  # the first walk imports and caches what it needs
        sys.setprofile(record if traced else None)
        try:
            run_stages((), project / out, RunConfig.read(project / "run.toml"), progress=False)
        finally:
            sys.setprofile(None)
    return walk


def test_the_config_walk_climbs_back_up_at_most_five_times(tmp_path):
    """The config walk climbs back up at most five times (nine times before issue 29's rework).

    The walk: every call, in order, from a function of one ``concept_influence`` module into a function of another,
    recorded with ``sys.setprofile`` (the caller is the nearest frame running ``concept_influence`` code, so a call
    made through the standard library, e.g. ``dataclasses.replace`` or ``contextlib``, counts as its caller's; a
    generator counts when first entered, not when resumed), while the run-folder tests' project config, with
    ``[model] device = "cpu"`` and ``device_memory = "1TiB"`` (so that the memory plan is made), is read by
    ``RunConfig.read`` and turned into a pipeline by ``run_stages((), out, config)``: the memory plan checked, the
    process group joined, the run folder created, the ``Pipeline`` built and its inputs checked; no stage runs. The
    walk recorded is the second of two alike, so that what the first imports and caches is not in it.

    A climb back up: a call of the walk whose caller module lies in a subpackage of ``concept_influence`` (the
    subpackage's ``__init__`` or a module in it: ``concept_influence.runs``, ``concept_influence.runs.folder``,
    ``concept_influence.curvature.fit``) and whose callee is a module of a package above the caller's
    (``concept_influence.config``, ``concept_influence.options``, ``concept_influence.distributed``). Each call
    counts, a call made twice twice; calls within one package's modules, down into a subpackage or across into
    another subpackage are no climbs. On failure the message lists the climbs, then the walk (``^``: a climb; a call
    repeated in a row is shown once with its count)."""
    walk = _config_walk(tmp_path)
    is_climb = [_package(a).startswith(_package(b) + ".") for a, _, b, _ in walk]
    climbs = [f"{a}.{f} -> {b}.{g}" for (a, f, b, g), climb in zip(walk, is_climb) if climb]
    shown = [f"{'^' if climb else ' '} {len(list(same))} x {a}.{f} -> {b}.{g}"
             for ((a, f, b, g), climb), same in itertools.groupby(zip(walk, is_climb))]
    assert len(climbs) <= 5, "\n".join([f"{len(climbs)} climbs back up:", *climbs, "", "the walk:", *shown])
