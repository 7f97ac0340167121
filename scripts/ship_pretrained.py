#!/usr/bin/env python
"""Regenerate the shipped weights (see tools/ship.py): python scripts/ship_pretrained.py --all"""

import sys
from pathlib import Path

# tools/ is the checkout's release tooling, not an installed package: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.ship import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
