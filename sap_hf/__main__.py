"""`python -m sap_hf ...`: the `sap-hf` command line (`sap_hf.cli`), where the console script is not on PATH."""

from .cli.commands import main


main()
