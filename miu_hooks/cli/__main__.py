"""``python -m miu_hooks.cli``: the same as the ``miu-unlearn`` console script."""

import sys

from miu_hooks.cli.commands import main

sys.exit(main())
