"""How the studies report: rows → a summary per group and method → the targets → the README's tables → a figure.

A study's rows are one dict per (setting, seed, method). `summarise` groups them by the study's keys (`by`, e.g.
`("label_set",)` or `("noise", "epochs")`, one nesting level per key) and averages every numeric field the rows of a
method all carry (`mean_std`: fractions stay fractions). `gap_targets` checks the issues' targets on a summary;
`print_tables` prints the tables the study pages (`benchmarks/studies/*.md`) show for the result (the specs below,
rendered from the JSON just written, so what a run prints is what the page will show); `bars` and `lines` draw the
figure.

The tables of the study pages are generated from the result JSONs, so prose and numbers cannot drift apart.

A generated table sits between a spec comment and an end marker in a page, each marker at the start of a line:

    <!-- table results/pretrained_cleanup.json
    columns: noise epochs
    rows:
      none
      fit(none)
      **sap+refine**
      diff(sap+refine, best_epoch)
      gap(sap+refine, none, oracle)
    -->
    | method | sym40 5 | ... |
    <!-- /table -->

`python benchmarks/tables.py` rewrites every such block from its JSON's `rows` (one dict per seed and method);
`--check` only reports the blocks whose text differs (the test suite runs it). Spec lines:

* `columns:` the row keys whose values make a column (in order of first appearance, or `key=v1,v2` to choose);
* `rows:` one per line: a method (mean ± std of `value` over seeds, in %, and `(N ep)` when the rows carry
  `cost_epochs`); `fit(m)`: the share of wrong training labels m's model predicts (`noisy_fit`); `diff(a, b)`:
  a's mean minus b's; `ratio(a, b)`: a's mean over b's ('1.70×', e.g. seconds against inference); `paired(a, b)`:
  a − b seed by seed (rows matched by `seed`), mean ± std; `gap(a, lo, hi)`: (a − lo) / (hi − lo), the share of the
  gap from lo to hi that a closes; `a / b`: the means of a and b in one cell ('39.1 / 46.4'). `**m**` prints the
  label in bold; `m = label` prints `label` as the row's first cell;
* `shared:` methods whose rows do not depend on the column (e.g. `oracle`, trained on clean labels): every column
  shows the mean over all their rows (`where:` does not filter them);
* `where:` `key=value` tokens: only the rows that have these values; a row name with rows in some columns but not
  in another prints `–` there (one with no rows at all is an error);
* `value:` the row key averaged (default `test_accuracy`, in % when all its values are fractions; a dotted key
  such as `selection_seconds.curvature` reads inside a row's dict, here and in `fields:`); more tokens
  give each column group one column per token, `[+]key[:digits][=label]`: `+` prints a sign, `:digits` prints the
  raw values with that many digits, `=label` is appended to the group's header (`+gain_vs_none=gain`). Derived
  rows fill the first token's columns only; `(N ep)` is left out when `cost_epochs` has a column;
* `title:` the first header cell (default `method`); `from:` the JSON's list of rows to read (default `rows`; e.g.
  `audits`, or a dotted path such as `extrapolation.table`); several JSON paths on the first line: their rows
  together (e.g. two regimes as columns; a row name, column and seed an earlier JSON has is not read again from a
  later one); `key:` the row keys that name a table row (default `method`; e.g.
  `detector`; several: their values joined by spaces, absent ones left out: `method forget_set` names the rows
  `ssd oracle`, `none`);
* `fields: average_precision:3 cost_epochs:1` instead of `columns:`: one column per field (mean ± std over the
  rows, with that many digits, no scaling). A token `[+]field:digits:how=label` chooses how the rows combine (`mean`,
  the default; `max`, `min`, `sum`; `count`: how many are true, 'k/n') and the header (underscores print as spaces).
  A cell whose rows all hold the field as null prints `–` (a key no row has is an error: a typo).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional


HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
STUDIES = HERE / "studies"
#: The project's README: its results tables are generated too (their JSON paths, like every page's, from benchmarks/).
PROJECT_README = HERE.parent / "README.md"


def table_pages() -> list[Path]:
    """The markdown files whose tables are generated: this folder's README (the index), every study page and the
    project's README."""
    return [README, *sorted(STUDIES.glob("*.md")), PROJECT_README]


BLOCK = re.compile(r"^(<!-- table (?P<spec>.*?)^-->\n)(?P<body>.*?)^(<!-- /table -->)$", re.S | re.M)
CALL = re.compile(r"^(?P<fn>fit|diff|ratio|paired|gap)\((?P<args>.*)\)$")
MINUS = "\u2212"


#: The fields a summary averages, when every row of a method has them.
FIELDS = (
    "test_accuracy",
    "val_accuracy",
    "noisy_fit",
    "gain_vs_none",
    "gain_vs_base",
    "purity",
    "cost_epochs",
    "audit_ap",
    "audit_ap_before",
    "selection_seconds",
    "seconds",
)


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """`{"mean", "std" (sample; 0 for one value), "n"}`."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def row_name(row: dict[str, Any], key: str = "method") -> str:
    """A row's method in a summary; the peers' rows add their forget set ('scrub (realistic)')."""
    return f"{row[key]} ({row['forget_set']})" if row.get("forget_set") else str(row[key])


def summarise(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str],
    fields: Sequence[str] = FIELDS,
    shared: Optional[str] = None,
    key: str = "method",
    flat: bool = False,
) -> dict[str, Any]:
    """`{by[0] value: {by[1] value: ... {method: {field: mean_std, "seeds": [...]}}}}` (values as strings); `flat`:
    one level, the `by` values joined by spaces ('pretrained sym40 20'). `key`: the row key naming the method.

    `shared`: rows whose first key has this value (e.g. 'oracle', the clean-label training of a study whose settings
    are noise types) are shown in every group."""
    everywhere = [r for r in rows if shared is not None and str(r[by[0]]) == shared]
    summary: dict[str, Any] = {}
    for row in rows:
        if shared is not None and str(row[by[0]]) == shared:
            continue
        node = summary
        for value in [" ".join(str(row[k]) for k in by)] if flat else [str(row[k]) for k in by]:
            node = node.setdefault(value, {})
        node.setdefault(row_name(row, key), []).append(row)

    def finish(node: dict[str, Any], depth: int) -> dict[str, Any]:
        if depth < (1 if flat else len(by)):
            return {k: finish(v, depth + 1) for k, v in node.items()}
        methods = dict(node)
        for row in everywhere:
            methods.setdefault(row_name(row, key), []).append(row)
        return {
            name: {
                **{f: mean_std(r[f] for r in group) for f in fields if all(_number(r.get(f)) for r in group)},
                "seeds": [r["seed"] for r in group],
            }
            for name, group in methods.items()
        }

    return finish(summary, 0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cells(summary: dict[str, Any], depth: int) -> Iterable[tuple[tuple[str, ...], dict[str, Any]]]:
    """The (group path, methods) of a summary nested `depth` levels deep."""
    if depth == 0:
        yield (), summary
        return
    for key, node in summary.items():
        for path, methods in cells(node, depth - 1):
            yield (key, *path), methods


def gap_targets(
    summary: dict[str, Any], depth: int, pipelines: Sequence[str] = ("sap+refine", "best+sap+refine")
) -> dict[str, Any]:
    """The issues' targets per group, on means over seeds in points: `sap` >= `none` - 0.5; each pipeline >=
    `best_epoch` + 2 and >= 50% of the gap from `none` to `oracle` (None where that gap is under 0.5 points)."""
    verdicts = {}
    for path, methods in cells(summary, depth):
        if not {"none", "best_epoch", "sap"} <= set(methods):
            continue
        mean = {m: 100 * v["test_accuracy"]["mean"] for m, v in methods.items()}
        verdict = {"sap_minus_none": mean["sap"] - mean["none"]}
        if "noisy_fit" in methods["none"]:
            verdict["noisy_fit_none"] = methods["none"]["noisy_fit"]["mean"]
        for name in (p for p in pipelines if p in mean):
            verdict[f"{name}_minus_best_epoch"] = mean[name] - mean["best_epoch"]
            for ceiling in ("oracle", "oracle+refine"):  # the oracle; the one with the clean-up's epochs
                if ceiling in mean:
                    gap = mean[ceiling] - mean["none"]
                    suffix = "" if ceiling == "oracle" else "_vs_oracle+refine"
                    verdict[f"{name}_gap_closed{suffix}"] = (mean[name] - mean["none"]) / gap if gap > 0.5 else None
        verdicts[" ".join(path)] = verdict
    return verdicts


def print_tables(result: Path, name: Optional[str] = None, pages: Optional[Sequence[Path]] = None) -> int:
    """Print the tables of `results/<name>` (default: `result`'s file name) rendered from `result`, those of
    `pages` (default: `table_pages()`).

    A table row this run did not compute (a smoke run, one setting) is left out; a table with none is skipped."""
    name = name or Path(result).name
    record = json.loads(Path(result).read_text())  # read once: each row of each table is tried on its rows
    shown = 0
    blocks = (match for page in pages or table_pages() for match in BLOCK.finditer(page.read_text()))
    for match in blocks:
        table = TableSpec(match["spec"])
        if f"results/{name}" not in table.paths:
            continue
        try:
            rows = table.rows_of(record)
        except KeyError:  # this result has no such list: none of the table's rows
            continue
        spec = match["spec"].split("\n")
        start = next(i for i, line in enumerate(spec) if line.startswith("rows:"))
        end = next((i for i in range(start + 1, len(spec)) if not spec[i].startswith((" ", "\t"))), len(spec))
        with_rows = lambda entries: "\n".join(spec[: start + 1] + entries + spec[end:])  # noqa: E731
        kept = [line for line in spec[start + 1 : end] if _renders(with_rows([line]), rows)]
        if kept:
            print("\n" + render(with_rows(kept), rows=rows))
            shown += 1
    return shown


def _renders(spec: str, rows: list[dict[str, Any]]) -> bool:
    try:
        render(spec, rows=rows)
    except (ValueError, KeyError, ZeroDivisionError):
        return False
    return True


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure.")
        return None
    return plt


def save_figure(figure: Any, path: Path, dpi: int = 120) -> str:
    """Lay out `figure`, write it to `path` as PNG, close it (so long runs do not pile up figures); the path as str."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return str(path)


def _colour(method: str) -> str:
    """Baselines grey/blue, SAP orange, the clean-ups red, the clean-label ceilings black."""
    if method.startswith("oracle"):
        return "black"
    if "refine" in method:
        return "tab:red"
    if "sap+" in method:
        return "tab:pink"
    if "sap" in method:
        return "orange"
    return "tab:blue" if method == "best_epoch" else "grey"


def bars(summary: dict[str, Any], path: Path, title: str, field: str = "test_accuracy") -> Optional[str]:
    """One panel per group of a one-level summary: every method's `field` in % (mean ± std over seeds)."""
    plt = pyplot()
    if plt is None or not summary:
        return None
    width = 6 if len(summary) < 4 else 3.5
    figure, axes = plt.subplots(1, len(summary), figsize=(width * len(summary), 4.4), squeeze=False)
    for axis, (group, methods) in zip(axes[0], summary.items()):
        first = ("none", "best_epoch")  # the baselines, then the methods as run, the clean-label ceilings last
        order = lambda m: (m.startswith("oracle"), first.index(m) if m in first else len(first))  # noqa: E731
        names = sorted((m for m in methods if field in methods[m]), key=order)
        means = [100 * methods[m][field]["mean"] for m in names]
        errors = [100 * methods[m][field]["std"] for m in names]
        axis.bar(range(len(names)), means, yerr=errors, capsize=3, color=[_colour(m) for m in names])
        axis.set_xticks(range(len(names)), names, rotation=50, ha="right", fontsize=8)
        if min(means) > 0:  # accuracies: the differences, not the bars' common base, are what is read
            axis.set_ylim(max(0.0, min(means) - 5), max(means) + 3)
        axis.set_title(f"{title} {group}", fontsize=9)
        axis.set_ylabel(f"{field.replace('_', ' ')} (%)")
    return save_figure(figure, path)


def lines(summary: dict[str, Any], path: Path, title: str, xlabel: str, field: str = "test_accuracy") -> Optional[str]:
    """One panel per first-level group of a two-level summary, x = the second level (numbers, log scale), one line
    per method (`field` in %, mean over seeds)."""
    plt = pyplot()
    if plt is None or not summary:
        return None
    figure, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4.2), squeeze=False, sharey=True)
    for axis, (group, by_x) in zip(axes[0], summary.items()):
        xs = sorted(by_x, key=float)
        for method in dict.fromkeys(m for x in xs for m in by_x[x]):
            points = [(float(x), 100 * by_x[x][method][field]["mean"]) for x in xs if field in by_x[x].get(method, {})]
            style = {"lw": 2.2} if method == "sap+refine" else {"ls": "--"} if method.startswith("best") else {}
            axis.plot(*zip(*points), marker="o", ms=3, label=method, **style)
        axis.set_xscale("log")
        axis.set_xticks([float(x) for x in xs], xs)
        axis.minorticks_off()
        axis.set_xlabel(xlabel, fontsize=8)
        axis.set_title(f"{title} {group}", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{field.replace('_', ' ')} (%)")
    axes[0][-1].legend(fontsize=6, loc="lower left")
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------------
# The study pages' tables (`python benchmarks/tables.py` rewrites them)
# --------------------------------------------------------------------------------------------


class NotRun(ValueError):
    """A row name without rows in one column that has rows in another: the cell prints '–'."""


class TableSpec:
    """One block's spec: the JSON, the columns (keys with an optional order, or fields), the rows, the options."""

    def __init__(self, text: str):
        lines = [line.rstrip() for line in text.strip().split("\n")]
        self.paths = lines[0].split()  # several JSONs: their rows together
        self.path = " ".join(self.paths)
        self.source = "rows"
        self.columns: list[tuple[str, Optional[list[str]]]] = []
        self.fields: list[Column] = []
        self.rows: list[str] = []
        self.shared: set[str] = set()
        self.where: dict[str, str] = {}
        self.values: list[Value] = [Value("test_accuracy")]
        self.title, self.keys = "method", ["method"]
        in_rows = False
        for line in lines[1:]:
            key, _, rest = line.strip().partition(":")
            if in_rows and line.startswith((" ", "\t")):
                self.rows.append(line.strip())
            elif key == "rows":
                in_rows = True
            elif key == "columns":
                self.columns = [_column(token) for token in rest.split()]
            elif key == "fields":
                self.fields = [_field(token) for token in rest.split()]
            elif key == "shared":
                self.shared = set(rest.split())
            elif key == "where":
                self.where = dict(token.partition("=")[::2] for token in rest.split())
            elif key == "value":
                self.values = [_value(token) for token in rest.split()]
            elif key == "key":
                self.keys = rest.split()
            elif key == "title":
                self.title = rest.strip()
            elif key == "from":
                self.source = rest.strip()
            elif line.strip():
                raise ValueError(f"table spec for {self.path}: cannot read the line {line!r}")
        if not (self.columns or self.fields) or not self.rows or not self.values:
            raise ValueError(f"table spec for {self.path}: needs 'columns:' (or 'fields:') and 'rows:'")

    def rows_of(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows `from:` names in a result record (a dotted path: `extrapolation.table`); KeyError naming the path
        where the record has none."""
        node: Any = record
        for key in self.source.split("."):
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{self.path}: no {self.source!r} in the JSON (from: {self.source})")
            node = node[key]
        return node

    def name(self, row: dict[str, Any]) -> str:
        """The table row a JSON row belongs to: its `key:` values joined by spaces (absent keys left out)."""
        return " ".join(str(row[key]) for key in self.keys if row.get(key) is not None)


class Value(NamedTuple):
    """A `value:` token: the row key averaged, its header label, its digits (None: 1, in % for fractions), sign."""

    field: str
    label: str = ""
    digits: Optional[int] = None
    signed: bool = False


def _value(token: str) -> Value:
    token, _, label = token.partition("=")
    field, _, digits = token.partition(":")
    return Value(field.lstrip("+"), label, int(digits) if digits else None, field.startswith("+"))


class Column(NamedTuple):
    """A table column: its header, the group of rows it reads, the field it averages, its digits, scale, sign;
    `main`: the first `value:` token's column (the one with costs and derived rows); `how`: how a cell combines its
    rows (`mean` ± std, `max`, `min`, `sum`, `count` of the true ones)."""

    label: str
    group: str
    field: str
    digits: int = 1
    scale: float = 1.0
    signed: bool = False
    main: bool = True
    how: str = "mean"


FIELD_AGGREGATES = ("mean", "max", "min", "sum", "count")


def _field(token: str) -> Column:
    """A `fields:` token, `field[:digits[:how]][=label]`, as its column."""
    spec, _, label = token.partition("=")
    head, _, how = spec.rpartition(":") if spec.count(":") == 2 else (spec, "", "mean")
    if how not in FIELD_AGGREGATES:
        raise ValueError(f"fields: {spec!r} combines its rows by {how!r}; one of {', '.join(FIELD_AGGREGATES)}")
    value = _value(head)  # sign, field and digits as a `value:` token reads them
    field, digits = value.field, 1 if value.digits is None else value.digits
    return Column(label.replace("_", " ") or field, "", field, digits, signed=value.signed, how=how)


def _column(token: str) -> tuple[str, Optional[list[str]]]:
    key, _, order = token.partition("=")
    return key, (order.split(",") if order else None)


def _get(row: dict[str, Any], field: str) -> Any:
    """`row[field]`; a dotted field (`selection_seconds.curvature`) reads inside the row's dicts. None where absent."""
    if "." not in field or field in row:
        return row.get(field)
    node: Any = row
    for key in field.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _group(row: dict[str, Any], spec: TableSpec) -> str:
    return " ".join(str(row.get(key)) for key, _ in spec.columns)


def _columns(rows: list[dict[str, Any]], spec: TableSpec) -> list[Column]:
    """`fields:` one column per field over every row; else one per value of the column keys, in the chosen
    orders, else in order of first appearance (shared rows aside), and per `value:` token (in % when fractions)."""
    if spec.fields:
        return spec.fields
    orders = [order for _, order in spec.columns]
    seen: dict[tuple, None] = {}
    for row in rows:
        if spec.name(row) not in spec.shared:
            seen.setdefault(tuple(str(row.get(key)) for key, _ in spec.columns), None)
    kept = [v for v in seen if all(order is None or x in order for x, order in zip(v, orders))]
    kept.sort(key=lambda v: tuple(order.index(x) if order else 0 for x, order in zip(v, orders)))  # stable
    columns = []
    for v in kept:
        for i, value in enumerate(spec.values):
            found = [_get(row, value.field) for row in rows if _get(row, value.field) is not None]
            scale = 100.0 if value.digits is None and found and all(abs(x) <= 1.0 for x in found) else 1.0
            label = " ".join((*v, value.label)).strip()
            digits = 1 if value.digits is None else value.digits
            columns.append(Column(label, " ".join(v), value.field, digits, scale, value.signed, i == 0))
    return columns


class _Cells:
    """The rows of each (table row name, column group): what every cell averages over seeds."""

    def __init__(self, rows: list[dict[str, Any]], spec: TableSpec, columns: list[Column]):
        self.spec, self.columns = spec, columns
        groups = list(dict.fromkeys(column.group for column in columns))
        self.values: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            name = spec.name(row)
            for group in groups if name in spec.shared or spec.fields else [_group(row, spec)]:
                self.values.setdefault((name, group), []).append(row)

    def rows_of(self, name: str, column: Column, field: str) -> list[dict[str, Any]]:
        found = [row for row in self.values.get((name, column.group), []) if _get(row, field) is not None]
        if not found:
            where = f" in column {column.group!r}" if column.group else ""
            key = " ".join(self.spec.keys)
            elsewhere = (name, column.group) not in self.values and any(known == name for known, _ in self.values)
            error = NotRun if elsewhere else ValueError
            raise error(f"{self.spec.path}: no rows for {key} {name!r}{where} with {field!r}")
        return found

    def mean(self, name: str, column: Column, field: Optional[str] = None) -> float:
        field = field or column.field
        return statistics.fmean(_get(row, field) for row in self.rows_of(name, column, field))

    def cell(self, name: str, column: Column) -> str:
        if not column.main and (name, column.group) in self.values:  # a row without this field: an empty cell
            if all(_get(row, column.field) is None for row in self.values[name, column.group]):
                return ""
        recorded = self.values.get((name, column.group), [])
        if recorded and all(column.field in row and row[column.field] is None for row in recorded):
            return "–"  # recorded as null: no value (e.g. an alpha the search left unchanged), not a typo
        found = self.rows_of(name, column, column.field)
        values = [_get(row, column.field) * column.scale for row in found]
        if column.how == "count":
            return f"{sum(bool(value) for value in values)}/{len(values)}"
        if column.how in ("max", "min", "sum"):
            value = {"max": max, "min": min, "sum": sum}[column.how](values)
            return _signed(value, column.digits) if column.signed else f"{value:.{column.digits}f}"
        mean = statistics.fmean(values)
        text = _signed(mean, column.digits) if column.signed else f"{mean:.{column.digits}f}"
        if len(values) > 1:
            text += f" ± {statistics.stdev(values):.{column.digits}f}"
        costs = [row["cost_epochs"] for row in found if row.get("cost_epochs") is not None]
        shown = any(value.field == "cost_epochs" for value in self.spec.values)
        if costs and column.main and not self.spec.fields and not shown:
            text += f" ({statistics.fmean(costs):.0f} ep)"
        return text

    def paired(self, a: str, b: str, column: Column) -> str:
        """a − b seed by seed (the seeds both have), mean ± std, signed."""
        of_b = {row["seed"]: _get(row, column.field) for row in self.rows_of(b, column, column.field)}
        found = [row for row in self.rows_of(a, column, column.field) if row["seed"] in of_b]
        diffs = [column.scale * (_get(row, column.field) - of_b[row["seed"]]) for row in found]
        if not diffs:
            raise ValueError(f"{self.spec.path}: {a!r} and {b!r} share no seed in column {column.group!r}")
        text = _signed(statistics.fmean(diffs), column.digits)
        return text + (f" ± {statistics.stdev(diffs):.{column.digits}f}" if len(diffs) > 1 else "")


def _signed(value: float, digits: int = 1) -> str:
    """'+2.9', '−0.5' (a typographic minus), '0.0' for what rounds to zero."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text.replace("-", MINUS)


def _derived(fn: str, args: list[str], cells: _Cells) -> Optional[tuple[str, Callable[[Column], str]]]:
    """A derived row's label and the function that fills one of its cells (None: not a derived row)."""
    if fn == "fit" and len(args) == 1:
        return f"{args[0]} fits (wrong labels)", lambda c: f"{100 * cells.mean(args[0], c, 'noisy_fit'):.0f}%"
    if fn == "diff" and len(args) == 2:
        return f"{args[0]} {MINUS} {args[1]}", lambda c: _signed(
            c.scale * (cells.mean(args[0], c) - cells.mean(args[1], c)), c.digits
        )
    if fn == "ratio" and len(args) == 2:
        return f"{args[0]} ÷ {args[1]}", lambda c: f"{cells.mean(args[0], c) / cells.mean(args[1], c):.2f}×"
    if fn == "paired" and len(args) == 2:
        return f"{args[0]} {MINUS} {args[1]} (per seed)", lambda c: cells.paired(args[0], args[1], c)
    if fn == "gap" and len(args) == 3:

        def gap(c: Column) -> str:
            a, lo, hi = (cells.mean(m, c) for m in args)
            return f"{100 * (a - lo) / (hi - lo):.0f}%" if hi != lo else "n/a"

        return f"{args[0]}: gap {args[1]} → {args[2]} closed", gap
    return None


def _means(names: list[str], cells: _Cells) -> tuple[str, Callable[[Column], str]]:
    """An `a / b` row: each name's mean in one cell, joined by ' / ' (no std, no cost)."""
    return " / ".join(names), lambda c: " / ".join(f"{c.scale * cells.mean(n, c):.{c.digits}f}" for n in names)


def _row(entry: str, cells: _Cells) -> list[str]:
    """A table row's cells: '–' where a row name has no rows in that column (but has some in another), and
    derived rows fill the main columns only (the other `value:` columns stay empty). `entry = label` prints the
    label instead of the entry's own."""
    entry, _, shown = (part.strip() for part in entry.partition(" = "))
    bold = entry.startswith("**") and entry.endswith("**")
    name = entry.strip("*")
    call = CALL.match(name)
    derived = None if call is None else _derived(call["fn"], [a.strip() for a in call["args"].split(",")], cells)
    if call is not None and derived is None:
        raise ValueError(
            f"{cells.spec.path}: cannot read the row {entry!r} (fit(m), diff(a, b), ratio(a, b), paired(a, b), gap(a, lo, hi))"
        )
    if derived is None and " / " in name:
        derived = _means([part.strip() for part in name.split(" / ")], cells)
    label, compute = derived or (name, lambda c: cells.cell(name, c))
    label = shown or label
    values = []
    for column in cells.columns:
        try:
            values.append(compute(column) if column.main or derived is None else "")
        except NotRun:
            values.append("–")
    return [f"**{label}**" if bold else label, *values]


def render(spec_text: str, root: Path = HERE, rows: Optional[list[dict[str, Any]]] = None) -> str:
    """The markdown table (with its trailing newline) that a block's spec describes, from its JSON's rows (`rows`:
    those rows, already read)."""
    spec = TableSpec(spec_text)
    if rows is None:
        rows, seen = [], set()
        for path in spec.paths:  # a (row name, column, seed) an earlier JSON has is not read again
            found = spec.rows_of(json.loads((root / path).read_text()))
            rows += [row for row in found if (spec.name(row), _group(row, spec), row.get("seed")) not in seen]
            seen |= {(spec.name(row), _group(row, spec), row.get("seed")) for row in found}
    rows = [
        row
        for row in rows
        if spec.name(row) in spec.shared or all(str(row.get(k)) == v for k, v in spec.where.items())
    ]
    columns = _columns(rows, spec)
    cells = _Cells(rows, spec, columns)
    lines = [[spec.title, *(c.label for c in columns)], ["---"] * (len(columns) + 1)]
    lines += [_row(entry, cells) for entry in spec.rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def refresh(text: str, root: Path = HERE) -> tuple[str, list[str]]:
    """`text` with every block regenerated, and the JSON paths of the blocks that changed."""
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        body = render(match["spec"], root)
        if body != match["body"]:
            changed.append(TableSpec(match["spec"]).path)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed
