"""The `sap-hf` command line (`correct`, `audit`, `push`) and the argument parsing it shares with the recipe."""

from .commands import main

__all__ = ["main"]
