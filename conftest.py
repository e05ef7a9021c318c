"""Root conftest: settings for every test, including the notebooks that nbmake executes.

nbmake starts each notebook's kernel as a subprocess of pytest, so the kernel inherits this environment:
the notebooks run offline and at their reduced size (``CONCEPT_INFLUENCE_NOTEBOOK_QUICK=1``). Set the
variable to anything else before running pytest to execute them at full size.
"""

import os

os.environ.setdefault("CONCEPT_INFLUENCE_NOTEBOOK_QUICK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
