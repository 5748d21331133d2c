"""The package's layers, read from its folders: every import arrow points down.

`utils/` (option checks, atomic writes, sample identities) knows nothing of passes or SAP; `runtime/`
(passes over data, batching, processes) knows nothing of SAP; `core/` (SAP itself: config, math,
targets, statistics, selection, search) builds on it and knows nothing of a `Trainer`; `data/`
(readers, transforms, noise) stands alone; `audit/` reads what `core/` computes; the top-level modules
(`api`, `hub`, `evaluation`, ...) assemble them; `trainer/` (`SAPTrainer` and what only a `Trainer`
needs) sits on top of them; `cli/` is the outermost. Cheap static checks: the source is parsed,
nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "sap_hf"

# Folders in import order: a folder may import only folders before it (and itself).
FOLDERS = ["utils", "runtime", "core", "data", "audit"]
TRAINER = "trainer"  # a folder on top of the top-level modules: only the package's __init__ and cli import it
OUTERMOST = "cli"  # may import anything
# What only a `Trainer` brings: no module of these folders may import or take it.
TRAINER_FREE = ["utils", "runtime", "core"]
TRAINER_NAMES = {"Trainer", "TrainingArguments", "TrainerCallback", "TrainerState", "TrainerControl", "EvalPrediction"}
# The bottom of the import graph: they import no sap_hf module but each other (losses.py uses the
# argument checks), so each can be read, tested and reused without the engine.
LEAVES = ["core/projection.py", "core/formatting.py", "utils/checks.py", "utils/io.py", "utils/identity.py"]


def _unit(path: Path) -> str:
    """The folder a module lives in, or the module's own name at the top level."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _sap_imports(path: Path) -> set[str]:
    """The units (folders or top-level modules) of sap_hf that `path` imports, at any level."""
    package_parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(package_parts[:-1])[: len(package_parts) - node.level]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if target:
                    found.add(target[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "sap_hf" and "." in node.module:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sap_hf."))
    return found


def _sap_modules(path: Path) -> set[str]:
    """The sap_hf modules `path` imports, as paths relative to the package (`utils/checks.py`)."""
    package_parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package_parts[:-1])[: len(package_parts) - node.level]
            found.add("/".join([*base, *(node.module.split(".") if node.module else ["__init__"])]) + ".py")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sap_hf"):
            found.add("/".join(node.module.split(".")[1:] or ["__init__"]) + ".py")
        elif isinstance(node, ast.Import):
            found.update("/".join(a.name.split(".")[1:]) + ".py" for a in node.names if a.name.startswith("sap_hf."))
    return found


def test_leaf_modules_import_only_other_leaves():
    for name in LEAVES:
        assert _sap_modules(PACKAGE / name) <= set(LEAVES) - {name}, name


def test_every_module_lives_in_a_known_layer():
    units = {_unit(path) for path in PACKAGE.rglob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    known = {*FOLDERS, TRAINER, OUTERMOST}
    assert folders == known, f"new folder(s) {folders - known}: place them in FOLDERS"
    assert units - folders, "no top-level modules?"


def test_import_arrows_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit in (OUTERMOST, "__init__", "__main__"):  # __main__: `python -m sap_hf`, the cli's entry point
            continue
        imported = _sap_imports(path) - {unit, "__init__"}
        if unit in FOLDERS:  # a folder imports only earlier folders, never a top-level module, trainer/ or cli
            allowed = set(FOLDERS[: FOLDERS.index(unit)])
        elif unit == TRAINER:  # trainer/ imports folders and top-level modules, never cli
            allowed = {u for u in imported if u != OUTERMOST}
        else:  # a top-level module imports folders and other top-level modules, never trainer/ or cli
            allowed = {u for u in imported if u not in (OUTERMOST, TRAINER)}
        for name in sorted(imported - allowed):
            wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_core_and_runtime_know_nothing_of_a_trainer():
    """`core/` is SAP and `runtime/` the pass: no `Trainer`-side name imported, no function that takes a trainer."""
    found = []
    for folder in TRAINER_FREE:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                    found += [
                        f"{path.relative_to(PACKAGE)} imports {a.name}" for a in node.names if a.name in TRAINER_NAMES
                    ]
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                    found += [
                        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}(trainer)"
                        for a in arguments
                        if a.arg == "trainer"
                    ]
    assert not found, "\n".join(found)


def test_the_trainer_side_is_beside_the_trainer():
    """What only a `Trainer` needs lives in trainer/, not at the top level nor in core/."""
    trainer_side = {"recorded.py", "checkpoints.py", "adapters.py", "evaluation.py", "trainer.py"}
    assert trainer_side <= {path.name for path in (PACKAGE / TRAINER).glob("*.py")}
    assert not (PACKAGE / "trainer.py").exists() and not (PACKAGE / "checkpoints.py").exists()
    assert not (PACKAGE / "core" / "recorded.py").exists() and not (PACKAGE / "core" / "evaluation.py").exists()


MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_NAMES = 16


def _code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of code of a function: its span without the docstring, blank and comment-only lines."""
    body = node.body
    doc = None
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        doc = range(body[0].lineno, body[0].end_lineno + 1)
    count = 0
    for number in range(node.lineno, node.end_lineno + 1):
        text = lines[number - 1].strip()
        if text and not text.startswith("#") and not (doc and number in doc):
            count += 1
    return count


def test_no_library_function_is_over_60_lines_of_code():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.split("\n")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = _code_lines(lines, node)
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_top_level_exports_at_most_16_names_that_all_resolve():
    import sap_hf

    assert len(sap_hf.__all__) <= MAX_TOP_LEVEL_NAMES, sap_hf.__all__
    assert all(hasattr(sap_hf, name) for name in sap_hf.__all__)
    public = {name for name in vars(sap_hf) if not name.startswith("_")} - set(sap_hf.__all__)
    modules = {name for name in public if isinstance(getattr(sap_hf, name), type(sap_hf))}
    assert public == modules, f"names outside __all__: {sorted(public - modules)}"


def test_the_function_length_check_counts_code_not_docstrings():
    source = 'def f():\n    """Doc\n    more."""\n    # comment\n\n    x = 1\n    return x\n'
    node = ast.parse(source).body[0]
    assert _code_lines(source.split("\n"), node) == 3  # def, x = 1, return x


# benchmarks/: a runnable script (`if __name__ == "__main__"`) is imported by no other benchmark file, and no
# benchmark file imports a library private (a `sap_hf` module or name starting with "_"). What the scripts share
# lives in support modules (common.py, audits.py, methods.py, peers.py, report.py, pretrained_regime.py).
BENCHMARKS = PACKAGE.parent / "benchmarks"


def _benchmark_import_problems(sources: dict[str, str]) -> set[str]:
    """'<file> imports script <name>' / '<file> imports private <dotted name>' for {file name: source}."""
    trees = {name: ast.parse(source) for name, source in sources.items()}
    scripts = {
        name.removesuffix(".py")
        for name, tree in trees.items()
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)
    }
    found = set()
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [(alias.name, "") for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, imported in modules:
                parts = module.split(".")
                if parts[0] in scripts - {name.removesuffix(".py")}:
                    found.add(f"{name} imports script {parts[0]}")
                if parts[0] == "sap_hf" and any(p.startswith("_") for p in [*parts, imported] if p):
                    found.add(f"{name} imports private {'.'.join(filter(None, [module, imported]))}")
    return found


def test_no_benchmark_imports_a_script_or_a_library_private():
    sources = {path.name: path.read_text() for path in sorted(BENCHMARKS.glob("*.py"))}
    assert _benchmark_import_problems(sources) == set()


def test_the_benchmark_import_check_finds_scripts_and_privates():
    main = 'if __name__ == "__main__":\n    main()\n'
    sources = {
        "study.py": "import helper\nfrom other import run\n" + main,
        "other.py": "from sap_hf.data.fashion_mnist import _resolve\nimport sap_hf._x\n" + main,
        "helper.py": "from sap_hf.data import stratified_choice\n",
    }
    assert _benchmark_import_problems(sources) == {
        "study.py imports script other",
        "other.py imports private sap_hf.data.fashion_mnist._resolve",
        "other.py imports private sap_hf._x",
    }
