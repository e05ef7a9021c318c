"""The two packages are layers: probes (activation tensors, probes, directions, SAEs) never imports
concept_influence (models, data, concepts, estimators), which builds on it; the command-line modules for concepts
and for SAEs share what they share through cli_common, not through each other; no module of the library or of the
benchmarks is over 350 lines (tests/test_structure.py checks the rest of the structure)."""

import ast
import subprocess
import sys
from pathlib import Path

PROBES = Path(__file__).resolve().parents[1] / "probes"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_probes_never_imports_concept_influence():
    offenders = {p.name: sorted(m for m in _imported_modules(p) if m.split(".")[0] == "concept_influence")
                 for p in sorted(PROBES.rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_probes_loads_no_concept_influence_module():
    code = "import sys, probes; print(sorted(m for m in sys.modules if m.split('.')[0] == 'concept_influence'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PROBES.parent).stdout
    assert out.strip() == "[]"


def _relative_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_the_concept_and_sae_commands_do_not_import_each_other():
    package = PROBES.parent / "concept_influence"
    assert "cli_sae" not in _relative_imports(package / "cli_concept.py")
    assert "cli_concept" not in _relative_imports(package / "cli_sae.py")


def test_no_module_is_over_350_lines():
    root = PROBES.parent
    paths = [*root.glob("concept_influence/**/*.py"), *PROBES.rglob("*.py"), *root.glob("concept_influence_benchmarks/**/*.py")]
    long = {p.relative_to(root).as_posix(): n for p in sorted(paths)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 350}
    assert not long
