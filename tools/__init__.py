"""Release tooling of the learned_opt repository (not part of the installed package: the wheel
ships ``learned_opt*`` only). Run from a checkout: ``python scripts/ship_pretrained.py NAME``."""
