"""Which packages an install holds (the rest of the project's metadata is in pyproject.toml).

A wheel (`pip wheel .`, `python -m build`) holds the library: concept_influence and probes. An editable install
(`pip install -e ".[dev]"`, what `make install` runs) also holds the benchmarks, concept_influence_benchmarks, which
import the library and are never imported by it; `concept-influence bench ...` needs them. setuptools runs this file
with the command it builds, `editable_wheel` (or `develop`) for an editable install.
"""

import sys

from setuptools import find_packages, setup

LIBRARY = ["concept_influence", "concept_influence.*", "probes", "probes.*"]
BENCHMARKS = ["concept_influence_benchmarks", "concept_influence_benchmarks.*"]
EDITABLE = {"editable_wheel", "develop"}

setup(packages=find_packages(include=LIBRARY + (BENCHMARKS if EDITABLE & set(sys.argv) else [])))
