"""benchmarks/tables.py: the study pages' generated tables equal what their JSONs say, and the generator reads its
specs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import tables  # noqa: E402


def test_every_generated_table_of_the_table_pages_matches_its_json() -> None:
    pages = tables.table_pages()
    assert len(pages) >= 7 and pages[0] == BENCHMARKS / "README.md"
    texts = [page.read_text() for page in pages]
    assert sum(len(tables.BLOCK.findall(text)) for text in texts) >= 30
    changed = [path for text in texts for path in tables.refresh(text)[1]]
    assert changed == [], f"stale tables (run python benchmarks/tables.py): {changed}"


def _rows() -> list[dict]:
    rows = []
    for seed, (none, best, sap) in enumerate([(0.50, 0.60, 0.70), (0.52, 0.62, 0.74)]):
        for setting, shift in (("b", 0.0), ("a", 0.1)):
            rows += [
                {"method": "none", "setting": setting, "seed": seed, "test_accuracy": none + shift, "noisy_fit": 0.9},
                {"method": "best_epoch", "setting": setting, "seed": seed, "test_accuracy": best + shift},
                {"method": "sap+x", "setting": setting, "seed": seed, "test_accuracy": sap + shift, "cost_epochs": 8},
            ]
        rows.append({"method": "oracle", "setting": "oracle", "seed": seed, "test_accuracy": 0.80})
    return rows


SPEC_BODY = """results/tiny.json
columns: setting
shared: oracle
rows:
  none
  fit(none)
  **sap+x**
  oracle
  diff(sap+x, best_epoch)
  gap(sap+x, none, oracle)
"""
SPEC = f"<!-- table {SPEC_BODY}-->\n"


def test_a_block_renders_means_costs_shared_rows_and_derived_rows(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.json").write_text(json.dumps({"rows": _rows()}))
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\n" + SPEC + "old\n<!-- /table -->\n\nprose\n")
    assert tables.main(["--pages", str(readme), "--root", str(tmp_path), "--check"]) == 1
    assert tables.main(["--pages", str(readme), "--root", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith("# T\n\n" + SPEC) and text.endswith("<!-- /table -->\n\nprose\n")
    assert tables.BLOCK.search(text)["body"] == (
        "| method | b | a |\n"
        "| --- | --- | --- |\n"
        "| none | 51.0 ± 1.4 | 61.0 ± 1.4 |\n"
        "| none fits (wrong labels) | 90% | 90% |\n"
        "| **sap+x** | 72.0 ± 2.8 (8 ep) | 82.0 ± 2.8 (8 ep) |\n"
        "| oracle | 80.0 ± 0.0 | 80.0 ± 0.0 |\n"
        "| sap+x \u2212 best_epoch | +11.0 | +11.0 |\n"
        "| sap+x: gap none \u2192 oracle closed | 72% | 111% |\n"
    )
    assert tables.main(["--pages", str(readme), "--root", str(tmp_path), "--check"]) == 0
    # One number moved in the JSON: the check names the block's file.
    rows = _rows()
    rows[0]["test_accuracy"] = 0.40
    (tmp_path / "results" / "tiny.json").write_text(json.dumps({"rows": rows}))
    assert tables.refresh(readme.read_text(), tmp_path)[1] == ["results/tiny.json"]


def test_a_chosen_column_order_and_the_errors_name_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.json").write_text(json.dumps({"rows": _rows()}))
    ordered = tables.render(SPEC_BODY.replace("columns: setting", "columns: setting=a,b"), tmp_path)
    assert ordered.startswith("| method | a | b |\n")
    only_a = tables.render(SPEC_BODY.replace("columns: setting", "where: setting=a\ncolumns: setting"), tmp_path)
    assert only_a.startswith("| method | a |\n") and "| none | 61.0 ± 1.4 |" in only_a
    with pytest.raises(ValueError, match="no rows for method 'missing' in column 'b'"):
        tables.render("results/tiny.json\ncolumns: setting\nrows:\n  missing\n", tmp_path)
    with pytest.raises(ValueError, match="cannot read the row 'gap\\(a\\)'"):
        tables.render("results/tiny.json\ncolumns: setting\nrows:\n  gap(a)\n", tmp_path)
    with pytest.raises(ValueError, match="cannot read the line 'colums: setting'"):
        tables.render("results/tiny.json\ncolums: setting\nrows:\n  none\n", tmp_path)


def test_fields_mode_names_rows_by_another_key_and_prints_each_field(tmp_path: Path) -> None:
    rows = [
        {"setting": s, "seed": seed, "detector": d, "average_precision": ap + seed / 100, "cost_epochs": 2.0 * seed}
        for s in ("sym40", "asym40")
        for seed in (0, 1)
        for d, ap in (("audit", 0.8), ("cv5", 0.9))
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    spec = "r.json\ntitle: detector\nkey: detector\nwhere: setting=sym40\nfields: average_precision:3 cost_epochs\n"
    assert tables.render(spec + "rows:\n  cv5\n  diff(cv5, audit)\n", tmp_path) == (
        "| detector | average_precision | cost_epochs |\n"
        "| --- | --- | --- |\n"
        "| cv5 | 0.905 ± 0.007 | 1.0 ± 1.4 |\n"
        "| cv5 \u2212 audit | +0.100 | 0.0 |\n"
    )


def test_a_field_recorded_as_null_prints_a_dash_and_one_never_recorded_is_an_error(tmp_path: Path) -> None:
    """An alpha the search left unchanged is recorded as null: a dash, not a failed table; a misspelt field is an
    error whether or not other fields are null."""
    rows = [{"source": "pass", "alpha": None, "seconds": 3.0}, {"source": "subset", "alpha": 100.0, "seconds": 1.0}]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    spec = "r.json\ntitle: source\nkey: source\nfields: alpha:0 seconds:1\nrows:\n  pass\n  subset\n"
    assert tables.render(spec, tmp_path).splitlines()[2:] == ["| pass | – | 3.0 |", "| subset | 100 | 1.0 |"]
    with pytest.raises(ValueError, match="no rows for source 'pass' with 'alphas'"):
        tables.render(spec.replace("alpha:0", "alphas:0"), tmp_path)


def test_a_field_can_be_the_largest_smallest_or_summed_value_or_a_count_with_its_own_header(tmp_path: Path) -> None:
    rows = [
        {"source": "pass", "gap": 0.0, "same": True, "seconds": 4.0},
        {"source": "pass", "gap": 0.0, "same": True, "seconds": 6.0},
        {"source": "subset", "gap": -1.25, "same": False, "seconds": 1.0},
        {"source": "subset", "gap": 3.0, "same": True, "seconds": 2.0},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    spec = "r.json\ntitle: source\nkey: source\nfields: +gap:1:max=max_gap same:0:count=same_choice seconds:1\n"
    assert tables.render(spec + "rows:\n  pass\n  subset\n", tmp_path) == (
        "| source | max gap | same choice | seconds |\n"
        "| --- | --- | --- | --- |\n"
        "| pass | 0.0 | 2/2 | 5.0 ± 1.4 |\n"
        "| subset | +3.0 | 1/2 | 1.5 ± 0.7 |\n"
    )
    spec = "r.json\ntitle: source\nkey: source\nfields: gap:2:min seconds:0:sum\n"
    assert tables.render(spec + "rows:\n  subset\n", tmp_path).splitlines()[2] == "| subset | -1.25 | 3 |"
    with pytest.raises(ValueError, match="'gap:1:median'.*one of mean, max, min, sum, count"):
        tables.render("r.json\nfields: gap:1:median\nrows:\n  pass\n", tmp_path)


def test_a_dotted_field_reads_inside_a_rows_dict_as_a_value_and_as_a_field(tmp_path: Path) -> None:
    rows = [
        {"method": "sap", "setting": "sym40", "seed": 0, "test_accuracy": 0.5, "seconds": {"loss": 2.0, "curv": 9.0}},
        {"method": "sap", "setting": "sym40", "seed": 1, "test_accuracy": 0.7, "seconds": {"loss": 4.0, "curv": 11.0}},
        {"method": "sap.x", "setting": "sym40", "seed": 0, "test_accuracy": 0.1, "seconds.curv": 1.0},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    fields = tables.render("r.json\nfields: seconds.loss:1=loss seconds.curv:1\nrows:\n  sap\n", tmp_path)
    # a row with the dotted name as its own key reads that key; one without the dict has no value there
    with pytest.raises(ValueError, match="no rows for method 'sap.x' with 'seconds.loss'"):
        tables.render("r.json\nfields: seconds.loss:1\nrows:\n  sap.x\n", tmp_path)
    assert tables.render("r.json\nfields: seconds.curv:1\nrows:\n  sap\n  sap.x\n", tmp_path) == (
        "| method | seconds.curv |\n| --- | --- |\n| sap | 10.0 ± 1.4 |\n| sap.x | 1.0 |\n"
    )
    assert fields == "| method | loss | seconds.curv |\n| --- | --- | --- |\n| sap | 3.0 ± 1.4 | 10.0 ± 1.4 |\n"
    by_setting = "r.json\ncolumns: setting\nvalue: test_accuracy seconds.curv:0=curv\nrows:\n  sap\n"
    assert tables.render(by_setting, tmp_path).splitlines()[2] == "| sap | 60.0 ± 14.1 | 10 ± 1 |"


def test_one_table_from_another_list_of_two_jsons(tmp_path: Path) -> None:
    for regime, ap in (("scratch", 0.5), ("mae", 0.6)):
        audits = [{"regime": regime, "method": "audit", "seed": s, "audit_ap": ap + s / 10} for s in (0, 1)]
        (tmp_path / f"{regime}.json").write_text(json.dumps({"rows": [], "audits": audits}))
    spec = "scratch.json mae.json\nfrom: audits\ncolumns: regime\nvalue: audit_ap:2=AP\nrows:\n  audit\n"
    assert tables.render(spec, tmp_path) == (
        "| method | scratch AP | mae AP |\n| --- | --- | --- |\n| audit | 0.55 ± 0.07 | 0.65 ± 0.07 |\n"
    )
    assert tables.TableSpec(spec).paths == ["scratch.json", "mae.json"]
    cv = [{"regime": "scratch", "method": "cv", "seed": 0, "audit_ap": 1.21}]
    (tmp_path / "cv.json").write_text(json.dumps({"audits": cv}))
    ratio = "scratch.json cv.json\nfrom: audits\ncolumns: regime\nvalue: audit_ap:2\nrows:\n  ratio(cv, audit)\n"
    assert tables.render(ratio, tmp_path).endswith("| cv ÷ audit | 2.20× |\n")  # 1.21 / 0.55
    (tmp_path / "nested.json").write_text(json.dumps({"cost": {"table": [{"method": "a", "hours": 2.5}]}}))
    nested = "nested.json\nfrom: cost.table\nfields: hours:1\nrows:\n  a\n"
    assert tables.render(nested, tmp_path).endswith("| a | 2.5 |\n")
    with pytest.raises(KeyError, match="no 'cost.rows' in the JSON"):
        tables.render(nested.replace("cost.table", "cost.rows"), tmp_path)


def test_several_values_per_column_signed_and_raw_and_a_row_named_by_two_keys(tmp_path: Path) -> None:
    rows = [
        {
            "method": m,
            "forget_set": f,
            "setting": "s",
            "seed": seed,
            "test_accuracy": acc + seed / 100,
            "gain": g,
            "cost_epochs": c + seed,
            "noisy_fit": 0.9,
        }
        for seed in (0, 1)
        for m, f, acc, g, c in (
            ("none", None, 0.5, 0.0, 0.1),
            ("ssd", "oracle", 0.6, 0.1, 0.3),
            ("ssd", "real", 0.4, -0.1, 2.0),
        )
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    spec = "r.json\ncolumns: setting\nkey: method forget_set\nvalue: test_accuracy +gain=gain cost_epochs:2=cost\n"
    assert tables.render(spec + "rows:\n  ssd oracle\n  diff(ssd real, none)\n  fit(none)\n", tmp_path) == (
        "| method | s | s gain | s cost |\n"
        "| --- | --- | --- | --- |\n"
        "| ssd oracle | 60.5 ± 0.7 | +10.0 ± 0.0 | 0.80 ± 0.71 |\n"  # no '(N ep)': the costs have their column
        "| ssd real \u2212 none | \u221210.0 |  |  |\n"  # derived rows fill the first value's columns only
        "| none fits (wrong labels) | 90% |  |  |\n"
    )


def test_paired_differences_match_rows_by_seed(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    rows = [row for row in _rows() if not (row["method"] == "best_epoch" and row["seed"] == 1)]
    (tmp_path / "results" / "tiny.json").write_text(json.dumps({"rows": rows}))
    spec = "results/tiny.json\ncolumns: setting=b\nvalue: test_accuracy +gain_vs_none=gain\nrows:\n"
    # seed 0 only (best_epoch lacks seed 1): +10.0, no std; sap+x − none per seed: +20.0, +22.0
    assert tables.render(spec + "  paired(sap+x, best_epoch)\n  paired(sap+x, none)\n", tmp_path) == (
        "| method | b | b gain |\n"
        "| --- | --- | --- |\n"
        "| sap+x \u2212 best_epoch (per seed) | +10.0 |  |\n"
        "| sap+x \u2212 none (per seed) | +21.0 ± 1.4 |  |\n"
    )
    # a row without the second value's field leaves that cell empty; the first value's field is required
    assert tables.render(spec + "  none\n", tmp_path).endswith("| none | 51.0 ± 1.4 |  |\n")
    with pytest.raises(ValueError, match="no rows for method 'none' in column 'b' with 'missing'"):
        tables.render(spec.replace("test_accuracy", "missing") + "  none\n", tmp_path)


def test_a_method_not_run_in_one_column_prints_a_dash_there(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    rows = [row for row in _rows() if not (row["method"] == "sap+x" and row["setting"] == "a")]
    (tmp_path / "results" / "tiny.json").write_text(json.dumps({"rows": rows}))
    spec = "results/tiny.json\ncolumns: setting\nshared: oracle\nrows:\n  sap+x\n  diff(sap+x, none)\n"
    assert tables.render(spec, tmp_path).endswith(
        "| sap+x | 72.0 ± 2.8 (8 ep) | – |\n| sap+x \u2212 none | +21.0 | – |\n"
    )
    with pytest.raises(ValueError, match=r"no rows for method 'sap\+y'"):  # a name with no rows at all: a typo
        tables.render(spec.replace("sap+x", "sap+y"), tmp_path)


def test_rows_with_their_own_labels_two_means_in_a_cell_and_an_earlier_json_first(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.json").write_text(json.dumps({"rows": _rows()}))
    later = [dict(row, test_accuracy=0.0) for row in _rows()]  # the same rows again: not read a second time
    later += [dict(row, method="sap+y", test_accuracy=0.9) for row in _rows() if row["method"] == "sap+x"]
    (tmp_path / "results" / "later.json").write_text(json.dumps({"rows": later}))
    spec = "results/tiny.json results/later.json\ncolumns: setting=b\nshared: oracle\nrows:\n"
    rows = "  none / best_epoch = memorised / early\n  **sap+y** = SAP, y\n  oracle / sap+x\n"
    assert tables.render(spec + rows, tmp_path) == (
        "| method | b |\n"
        "| --- | --- |\n"
        "| memorised / early | 51.0 / 61.0 |\n"  # means only, in the order named
        "| **SAP, y** | 90.0 ± 0.0 (8 ep) |\n"  # only later.json has it: read from there
        "| oracle / sap+x | 80.0 / 72.0 |\n"
    )
