"""``python -m streamkl``: see :mod:`streamkl.cli` (subcommands ``bench`` and ``info``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
