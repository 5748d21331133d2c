"""House style that code review keeps missing, checked from the source (nothing is imported).

* one logging style (`transformers.utils.logging`), one type-hint style (`Optional`/`Union`), no
  `print` or `warnings.warn` for user-facing messages, in `sap_hf/data` as in the rest;
* one name for the key column (`sap_hf.utils.identity.KEY_COLUMN`);
* no measured numbers in docstrings, help strings or comments: they go stale as the code changes,
  and they live, with their protocol, in the study pages (benchmarks/studies/*.md).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "sap_hf"
DATA_MODULES = sorted((PACKAGE / "data").glob("*.py"))

# Measured numbers belong in the study pages (benchmarks/studies/*.md): no library module states one.
NUMBER_FREE = sorted(PACKAGE.rglob("*.py"))
MEASUREMENTS = {  # what a measured result looks like in prose
    "a comparison": r"\bvs\.?\s*[-+]?\d",
    "a gain in points": r"[+\-\u2212]\d+(\.\d+)?\s*points",
    "an approximate value": r"~\s*\d",
    "a measurement": r"\bmeasured\b[^.\n]*\d",
    "a timing": r"\b\d+(\.\d+)?\s*(s|ms|min|seconds|minutes)\s+(for|per|on)\b",
    "a speed ratio": r"\d(\.\d+)?\s*[x\u00d7]\s+(faster|slower|inference|an epoch)",
    "a benchmark script or result instead of its study page": r"benchmarks/(?!README\.md|studies/\w+\.md)[\w/.-]+",
}


def _annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            for arg in [
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                arguments.vararg,
                arguments.kwarg,
            ]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


@pytest.mark.parametrize("path", DATA_MODULES, ids=lambda p: p.name)
def test_data_modules_log_and_hint_like_the_rest_of_the_package(path):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "logging" not in imported and "warnings" not in imported, "use transformers.utils.logging"
    calls = [node.func for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert not [f for f in calls if isinstance(f, ast.Name) and f.id == "print"], "log instead of print"
    assert not [f for f in calls if isinstance(f, ast.Attribute) and f.attr in ("getLogger", "warn")]
    unions = [ast.unparse(a) for a in _annotations(tree) if any(isinstance(n, ast.BinOp) for n in ast.walk(a))]
    assert not unions, f"use Optional[...] / Union[...]: {unions}"
    if "logger" in {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }:
        assert "logger = logging.get_logger(__name__)" in path.read_text()


def test_clothing1m_names_the_key_column_through_the_shared_constant():
    source = (PACKAGE / "data" / "clothing1m.py").read_text()
    tree = ast.parse(source)
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "key"]
    assert not literals and "from ..utils.identity import KEY_COLUMN" in source


@pytest.mark.parametrize("path", NUMBER_FREE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_measured_numbers_in_the_library_text(path):
    found = [
        f"{path.name}:{number}: {what}: {line.strip()[:100]}"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for what, pattern in MEASUREMENTS.items()
        if re.search(pattern, line, re.IGNORECASE)
    ]
    assert not found, "move these to a study page (benchmarks/studies/) and point to it instead:\n" + "\n".join(found)


def test_the_measurements_moved_out_are_in_the_benchmarks_readme():
    folder = PACKAGE.parent / "benchmarks"  # the index and its study pages
    readme = "\n".join(p.read_text() for p in [folder / "README.md", *sorted((folder / "studies").glob("*.md"))])
    # float32 weight error at alpha 1e4 / 1e6 (was in SAPConfig's warning), bracket vs grid share of
    # evaluations (search.py), PNG encoding of Fashion-MNIST's training split (fashion_mnist.py).
    for text in (
        "2.4e-4 (1e4), 2.4e-2 (1e6)",
        "| shared | 90 | 31 | 0.34",
        "| per_kind | 342 | 126 | 0.37",
        "## Data loading",
    ):
        assert text in readme, text


def test_the_study_pages_and_sections_the_library_and_recipes_point_to_exist():
    """`benchmarks/studies/<page>.md, "<section>"` in a docstring, help text or recipe comment: the page exists and
    holds the words quoted (case and line breaks aside), so a pointer cannot outlive a page's rewrite."""
    root = PACKAGE.parent
    files = [
        *sorted(PACKAGE.rglob("*.py")),
        *sorted((root / "recipes").rglob("*.py")),
        *(root / "recipes").rglob("*.yaml"),
    ]
    pointer = re.compile(r"benchmarks/studies/(\w+)\.md(?:,\s*#?\s*[\"']([^\"']+)[\"'])?")
    found = 0
    for path in files:
        for page, section in pointer.findall(path.read_text()):
            found += 1
            study = root / "benchmarks" / "studies" / f"{page}.md"
            assert study.is_file(), f"{path.name} points to {study}, which does not exist"
            words = " ".join(section.replace("#", " ").split()).lower()
            assert words in " ".join(study.read_text().split()).lower(), f"{path.name}: no {section!r} in {page}.md"
    assert found >= 10  # the pointers this test guards are still written this way


def test_one_key_column_one_ignore_index_one_logits_helper():
    """Constants and the logits helper are defined once (runtime/), every other module imports them."""
    import re

    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    for pattern, home in (
        (r"^KEY_COLUMN\s*=", "utils/identity.py"),
        (r"^IGNORE_INDEX\s*=", "runtime/contract.py"),
        (r"^def (_?logits_of|_logits)\b", "runtime/modeling.py"),
    ):
        where = [str(p.relative_to(PACKAGE)) for p, s in sources.items() if re.search(pattern, s, re.M)]
        assert where == [home], (pattern, where)
