"""``python -m benchmarks [--quick] [--json PATH]``: run every benchmark."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
