"""The package's import arrows point down: scripts -> trainer/cli -> api -> engine -> math.

Cheap static checks (the source is parsed, nothing is imported), so a convenience import that
turns an arrow around fails here instead of growing into a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sap_hf"

# A module may import only modules of a LOWER rank. Modules not listed (added later) are not checked.
RANK = {
    # math and leaves: no sap_hf import at all
    "projection": 0, "formatting": 0, "batching": 0, "targets": 0, "noise": 0, "models": 0, "cli_args": 0,
    "losses": 0,
    # configuration (imports the math's alpha check; anything above may read it)
    "config": 0.5,
    # statistics, data, reporting
    "stats": 1, "data": 1, "hub": 1, "plotting": 1,
    # engine
    "evaluation": 2, "trusted": 2, "search": 2, "sources": 2,
    # what the corrected model says about the labels (reads the engine's views and scores)
    "audit": 2.5, "audit_report": 2.7, "cleanup": 2.7,
    # entry points
    "api": 3,
    "trainer": 4,
    "cli": 5,
}


def _sap_imports(path: Path) -> set[str]:
    """First-level sap_hf modules imported anywhere in `path` (module or function level)."""
    package_parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(package_parts[:-1])[: len(package_parts) - node.level]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if target:
                    found.add(target[0])
            elif node.module and node.module.split(".")[0] == "sap_hf" and "." in node.module:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sap_hf."))
    return found


def test_leaf_modules_import_no_sap_hf_module():
    for name in ("projection", "formatting", "losses"):
        assert _sap_imports(PACKAGE / f"{name}.py") == set(), name


def test_import_arrows_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if module not in RANK:
            continue
        for imported in _sap_imports(path) - {module}:
            if imported in RANK and RANK[imported] >= RANK[module]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {imported} (rank {RANK[imported]} >= {RANK[module]})")
    assert not wrong, "\n".join(wrong)
