"""``python -m cstwa_dist.cli``: the entry point torchrun starts (``launchers/torchrun.sh``, the ranks of
``bench train``), where no ``cstwa-dist`` script may be on the PATH."""

import sys

from cstwa_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
