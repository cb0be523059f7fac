#!/usr/bin/env python3
"""qcowfs beside QEMU, measured in one run: every speed figure the README reports.

    python scripts/bench.py [--size 1G] [--only SECTION]... [--quick] [--json]

The entry point of the benchmark; what it measures and how is in
scripts/benchlib/__init__.py, `--help` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchlib.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
