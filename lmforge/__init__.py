"""lmforge: the whole life of a large language model in plain PyTorch."""

__version__ = "0.1.0"
