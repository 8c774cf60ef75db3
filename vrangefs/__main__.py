"""``python -m vrangefs``: the same as the ``vrangefs`` command."""

import sys

from vrangefs.cli import main

sys.exit(main())
