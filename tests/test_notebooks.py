"""The notebooks are committed executed at full size, with their outputs, so that they can be read without running
them (`make notebooks` writes them); nbmake executes them again at the reduced size without writing back."""

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 2_000_000  # outputs kept reasonable: PNGs at modest DPI, no huge tables


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_carries_its_outputs(path):
    nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    unrun = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() and not c.outputs
             and c.execution_count is None]
    assert not unrun, f"{path.name}: cells {unrun} were not executed; run `make notebooks` before committing"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output ({errors[0].get('ename')})"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no plot"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes; lower the figures' DPI"
    assert any("CONCEPT_INFLUENCE_NOTEBOOK_QUICK" in c.source for c in code), f"{path.name} ignores the reduced-size switch"
    # the committed outputs are the full-size run, not the reduced one the test suite executes
    text = json.dumps([o for c in code for o in c.outputs])
    assert "full size:" in text and "quick size:" not in text, f"{path.name} was not committed at its full size"
