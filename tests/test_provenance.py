"""Spec records (pipeline.provenance): dated so that Snakemake's modification-time rule alone
reruns exactly the jobs whose outputs were made with another spec."""

from __future__ import annotations

from pathlib import Path

from pipeline import layout, provenance

OLD, NEW = {"params": {"k": 16}}, {"params": {"k": 3}}


def mtime(path: Path) -> float:
    return path.stat().st_mtime


def test_a_new_job_is_stale_until_it_has_run(tmp_path):
    record = tmp_path / "specs" / "fit_aligners" / "asif.json"
    assert provenance.request(record, OLD)  # never run: its outputs are not made yet
    assert mtime(record) > provenance.EPOCH
    provenance.record_made(record, OLD)
    assert Path(layout.made_record(str(record))).is_file()
    assert not provenance.request(record, OLD)
    assert mtime(record) == provenance.EPOCH  # older than any output: never a rerun


def test_an_edit_dates_the_record_now_and_a_revert_to_the_made_spec_back(tmp_path):
    record = tmp_path / "asif.json"
    provenance.request(record, OLD)
    provenance.record_made(record, OLD)
    provenance.request(record, OLD)
    assert provenance.request(record, NEW)  # edited: stale, dated now
    assert mtime(record) > provenance.EPOCH and '"k": 3' in record.read_text()
    # reverted before any run (a dry run of another config): the outputs match it again
    assert not provenance.request(record, OLD)
    assert mtime(record) == provenance.EPOCH


def test_an_edit_that_ran_and_then_a_revert_is_stale_again(tmp_path):
    record = tmp_path / "asif.json"
    provenance.request(record, OLD)
    provenance.record_made(record, OLD)
    provenance.request(record, NEW)
    provenance.record_made(record, NEW)  # the edited job ran
    assert not provenance.request(record, NEW)
    assert provenance.request(record, OLD)  # its outputs are NEW's now
    assert mtime(record) > provenance.EPOCH


def test_a_lost_made_record_reruns_the_job(tmp_path):
    record = tmp_path / "asif.json"
    provenance.request(record, OLD)
    provenance.record_made(record, OLD)
    provenance.request(record, OLD)
    Path(layout.made_record(str(record))).unlink()
    assert provenance.request(record, OLD)
    assert mtime(record) > provenance.EPOCH
