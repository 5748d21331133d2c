"""The `sap-hf` command line (`correct`, `audit`, `push`) and the argument parsing it shares with the recipe.

The commands live in `sap_hf.cli.commands`; `main` (re-exported here) is the `sap-hf` entry point.
"""

from .commands import main


__all__ = ["main"]
