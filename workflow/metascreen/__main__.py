"""``python -m metascreen``: the command line (see :mod:`metascreen.cli`)."""

import sys

from metascreen.cli import main

sys.exit(main())
