"""``python -m patchserve`` (and ``torchrun -m patchserve``) runs the console script."""

import sys

from patchserve.cli import main

sys.exit(main())
