"""``python -m concept_influence`` (what ``torchrun -m concept_influence`` launches): the command line."""

import sys

from .cli import main

sys.exit(main())
