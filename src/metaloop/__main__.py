"""``python -m metaloop``, also as launched by ``torchrun --nproc-per-node N -m metaloop train ...``."""

import sys

from metaloop.cli import main

if __name__ == "__main__":
    sys.exit(main())
