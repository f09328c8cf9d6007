"""``python -m lightning_stiffness report RUN_DIR ...``: the same as the ``lightning-stiffness`` command."""

import sys

from lightning_stiffness.report import main

if __name__ == "__main__":
    sys.exit(main())
