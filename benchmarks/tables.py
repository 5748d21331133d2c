"""The tables of the study pages (benchmarks/studies/*.md, the index benchmarks/README.md and the project's README),
generated from the result JSONs, so prose and numbers cannot drift apart.

The specs' format and the renderer are `report.py`'s (one place for the studies' summaries, tables and figures). A
spec's JSON path is relative to `--root` (benchmarks/, whichever page it sits in).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from report import BLOCK, HERE, TableSpec, refresh, render, table_pages  # noqa: F401  (tests import them from here)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the blocks that differ (exit 1 if any)")
    parser.add_argument("--pages", nargs="+", type=Path, default=None, help="default: the index and every study page")
    parser.add_argument("--root", type=Path, default=HERE, help="the folder the specs' JSON paths start from")
    args = parser.parse_args(argv)
    stale, total = [], 0
    for page in args.pages or table_pages():
        text = page.read_text()
        new, changed = refresh(text, args.root)
        total += len(BLOCK.findall(text))
        stale += [f"{page}: the table from {path} differs from the JSON" for path in changed]
        if new != text and not args.check:
            page.write_text(new)
    if args.check:
        for line in stale:
            print(f"{line}; run python benchmarks/tables.py")
        return 1 if stale else 0
    print(f"{total} tables, {len(stale)} rewritten" + "".join(f"\n  {line}" for line in stale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
