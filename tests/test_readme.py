"""The READMEs stay usable: the two fresh-machine commands come first, the top README stays short,
and every relative link (files and `#anchors`) points to something that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
READMES = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "benchmarks" / "studies").glob("*.md")),
    ROOT / "docs" / "checks.md",
]
RUN_COMMAND = (
    "apt-get update && apt-get install -y dataset-fashion-mnist && pip install torch==2.13.0 && "
    'pip install -e ".[audit]" && accelerate launch recipes/clothing1m.py'
)
TEST_COMMAND = (
    "apt-get update && apt-get install -y dataset-fashion-mnist; pip install torch==2.13.0 && "
    'pip install -e ".[test]" && ruff check . && ruff format --check . && python -m pytest -q'
)
MAX_CHARS = 15_000
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_starts_with_the_two_fresh_machine_commands():
    blocks = [block.strip() for block in FENCE.findall((ROOT / "README.md").read_text())]
    assert blocks[:2] == [RUN_COMMAND, TEST_COMMAND]


def test_the_benchmarks_index_stays_short_and_lists_every_study_page():
    """benchmarks/README.md is the index a newcomer reads first: the study pages hold protocols and tables."""
    index = (ROOT / "benchmarks" / "README.md").read_text()
    assert len(index) < MAX_CHARS, f"benchmarks/README.md has {len(index)} characters; move details to a study page"
    pages = sorted((ROOT / "benchmarks" / "studies").glob("*.md"))
    assert pages and all(f"](studies/{page.name})" in index for page in pages)


def test_readme_stays_short():
    size = len((ROOT / "README.md").read_text())
    assert size < MAX_CHARS, f"README.md has {size} characters; move details to benchmarks/README.md or other docs"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(readme: Path):
    text = FENCE.sub("", readme.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        path = (readme.parent / file_part).resolve() if file_part else readme
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{readme.relative_to(ROOT)}: " + "; ".join(broken)
