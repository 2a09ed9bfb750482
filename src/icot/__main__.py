"""``python -m icot``: the same as the ``icot`` console script."""

import sys

from icot.cli import main

sys.exit(main())
