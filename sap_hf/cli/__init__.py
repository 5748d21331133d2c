"""The `sap-hf` command line (`correct`, `audit`, `push`) and the argument parsing it shares with the recipe.

`sap_hf.cli.main` is the module of the commands; its `main` function is the `sap-hf` entry point.
The package does not rebind `main` to that function: it would shadow the module, so that
`from sap_hf.cli import main` (and even `import sap_hf.cli.main as m`) gave the function and
`main.COMMANDS` or patching `main.load_splits` failed.
"""

from . import main

__all__ = ["main"]
