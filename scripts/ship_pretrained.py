#!/usr/bin/env python
"""Regenerate the shipped weights (see learned_opt/ship.py): python scripts/ship_pretrained.py --all"""

import sys

from learned_opt.ship import main

if __name__ == "__main__":
    sys.exit(main())
