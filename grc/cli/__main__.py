"""``python -m grc.cli``: the same command as the ``grc`` script."""

import sys

from grc.cli import main

sys.exit(main())
