"""Atomic writes (`sap_hf.utils.io`) and the writers that use them: a failure never leaves a half-written file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sap_hf import hub
from sap_hf.audit import report
from sap_hf.utils.io import atomic_path, atomic_write, staged_save


class Boom(RuntimeError):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.csv"
    assert atomic_write(path, lambda handle: handle.write("a,b\r\nü\n")) == path
    assert path.read_bytes() == "a,b\r\nü\n".encode()  # UTF-8, newlines as written (what csv wants)
    atomic_write(path, lambda handle: handle.write(b"\x00\x01"), mode="wb")
    assert path.read_bytes() == b"\x00\x01" and _leftovers(path.parent) == []
    with pytest.raises(ValueError, match="mode='a' is invalid"):
        atomic_write(path, lambda handle: None, mode="a")


def test_atomic_write_gives_the_umask_permissions_not_a_temp_files(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic_write(tmp_path / "summary.json", lambda handle: handle.write("{}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # a tempfile.mkstemp file would be 0600


def test_a_failed_write_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("previous")

    def half_then_fail(handle):
        handle.write("half of the new")
        raise Boom()

    with pytest.raises(Boom):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "previous" and _leftovers(tmp_path) == []

    def interrupted(handle):
        handle.write("x")
        raise KeyboardInterrupt()

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C as well
        atomic_write(path, interrupted)
    assert path.read_text() == "previous" and _leftovers(tmp_path) == []


def test_atomic_path_serves_writers_that_want_a_file_name(tmp_path):
    path = tmp_path / "stats.safetensors"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and not path.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError, match="Nothing was written"):
        with atomic_path(path):
            pass
    assert path.read_bytes() == b"new" and _leftovers(tmp_path) == []


def test_staged_save_moves_files_in_on_success_and_keeps_the_old_ones_on_failure(tmp_path):
    (tmp_path / "model.bin").write_text("old")
    with pytest.raises(Boom):
        with staged_save(tmp_path) as stage:
            (stage / "model.bin").write_text("half")
            raise Boom()
    assert (tmp_path / "model.bin").read_text() == "old" and _leftovers(tmp_path) == []
    with staged_save(tmp_path) as stage:
        (stage / "model.bin").write_text("new")
        (stage / "nested").mkdir()
        (stage / "nested" / "a.txt").write_text("a")
    assert (tmp_path / "model.bin").read_text() == "new" and (tmp_path / "nested" / "a.txt").read_text() == "a"
    assert _leftovers(tmp_path) == [] and hub.staged_save is staged_save  # callers import it from hub


def test_write_sap_files_keeps_the_previous_record_when_the_card_fails(tmp_path, monkeypatch):
    (tmp_path / hub.SAP_RECORD_NAME).write_text('{"old": true}')

    def failing_card(record, model_name, card_fields=None):
        raise Boom()

    monkeypatch.setattr(hub, "build_model_card", failing_card)
    with pytest.raises(Boom):
        hub.write_sap_files(tmp_path, {"new": True})
    assert json.loads((tmp_path / hub.SAP_RECORD_NAME).read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_audit_csv_interrupted_mid_way_keeps_the_previous_csv(tmp_path):
    path = tmp_path / report.CSV_NAME
    path.write_text("rank,index\n1,0\n")

    class HalfAudit:
        def rows(self):
            yield {"rank": 1, "index": 7}
            raise Boom()

    with pytest.raises(Boom):
        report.write_audit_csv(HalfAudit(), path)
    assert path.read_text() == "rank,index\n1,0\n" and _leftovers(tmp_path) == []
