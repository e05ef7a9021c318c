"""The two packages are layers: probes (activation tensors, probes, directions, SAEs) never imports
concept_influence (models, data, concepts, estimators), which builds on it."""

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
