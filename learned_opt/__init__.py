"""learned_opt: learned optimizers for PyTorch."""

from learned_opt._version import __version__

__all__ = ["__version__"]
