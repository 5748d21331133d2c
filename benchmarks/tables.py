"""The tables of benchmarks/README.md, generated from the result JSONs, so prose and numbers cannot drift apart.

The specs' format and the renderer are `report.py`'s (one place for the studies' summaries, tables and figures).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from report import BLOCK, README, TableSpec, refresh, render  # noqa: F401  (tests and users import them from here)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the blocks that differ (exit 1 if any)")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new, changed = refresh(text, args.readme.parent)
    if args.check:
        for path in changed:
            print(f"{args.readme}: the table from {path} differs from the JSON; run python benchmarks/tables.py")
        return 1 if changed else 0
    if new != text:
        args.readme.write_text(new)
    print(f"{len(BLOCK.findall(text))} tables, {len(changed)} rewritten: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
