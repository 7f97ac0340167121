#!/usr/bin/env python
"""Meta-train a learned optimizer (same program as ``learned-opt meta-train``; see ``--help``)."""

import sys

from learned_opt.meta.cli import main

if __name__ == "__main__":
    sys.exit(main())
