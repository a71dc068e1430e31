"""``python -m benchmarks.peers [--quick] [--json PATH]``: trio-runs against Celery and arq."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
