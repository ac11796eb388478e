"""The verification report and check metadata, from synthetic outcomes (no database)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from supabase_migration.checks import outcome_metadata
from supabase_migration.report import Report, markdown_table
from supabase_migration.verify import ERROR, WARN, CheckOutcome


def _outcome(name: str, table: str = "public.patients", passed: bool = True, **kw) -> CheckOutcome:
    return CheckOutcome(
        name=name,
        table=table,
        passed=passed,
        severity=kw.pop("severity", ERROR),
        description=kw.pop("description", f"{table}: {name} ok."),
        details=kw.pop("details", {}),
        duration_s=kw.pop("duration_s", 0.25),
    )


COUNTS = _outcome(
    "row_count_matches",
    details={"source_rows": 1200, "target_rows": 1200, "ranges": 3, "mismatched_ranges": 0},
)
SUMS = _outcome("checksums_match", details={"ranges_verified": 3, "mismatched_ranges": 0})
BAD_SUMS = _outcome(
    "checksums_match",
    passed=False,
    description="public.patients: 1 of 3 ranges have different checksums (re-run 000001).",
    details={
        "ranges_verified": 3,
        "mismatched_ranges": 1,
        "partitions_to_rerun": ["000001"],
        "mismatches": [
            {
                "partition_key": "000001",
                "key_range": "[500, 1000)",
                "source_rows": 500,
                "target_rows": 500,
                "changed": [{"key": "id=7", "columns": ["ssn"]}],
            }
        ],
    },
)
MISSING_INDEX = _outcome(
    "indexes_match",
    passed=False,
    severity=WARN,
    description="public.patients: missing on target: patients_name_idx.",
    details={
        "missing": [{"name": "patients_name_idx", "definition": "USING btree (full_name)"}],
        "extra": [],
        "different": [],
        "renamed": [],
    },
)
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_markdown_table_escapes_cells() -> None:
    text = markdown_table(["a", "b"], [["x|y", "line\nbreak"], [None, 3]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | line break |", "|  | 3 |"]


def test_all_passing_is_pass() -> None:
    report = Report(outcomes=(COUNTS, SUMS), generated_at=WHEN, run_id="r1", seed=5)
    assert report.passed and report.status == "PASS" and report.exit_code == 0
    (summary,) = report.table_summaries()
    assert (summary.source_rows, summary.target_rows, summary.ranges_verified) == (1200, 1200, 3)
    assert summary.checksum_status == "match" and summary.status == "PASS"


def test_warnings_do_not_fail_but_errors_do() -> None:
    warned = Report(outcomes=(COUNTS, SUMS, MISSING_INDEX), generated_at=WHEN)
    assert warned.passed and len(warned.warnings) == 1
    assert warned.table_summaries()[0].status == "WARN"
    failed = Report(outcomes=(COUNTS, BAD_SUMS, MISSING_INDEX), generated_at=WHEN)
    assert not failed.passed and failed.status == "FAIL" and failed.exit_code == 1
    assert failed.table_summaries()[0].checksum_status == "1 range differs"


@dataclass(frozen=True)
class Finding:
    severity: str
    title: str


def test_security_findings_are_listed_and_critical_ones_fail() -> None:
    minor = Report(outcomes=(COUNTS,), security_findings=(Finding("warning", "RLS off on x"),))
    assert minor.passed and "RLS off on x" in minor.to_markdown()
    major = Report(
        outcomes=(COUNTS,),
        security_findings=({"severity": "critical", "title": "anon can read patients"},),
    )
    assert not major.passed
    assert json.loads(major.to_json())["security_findings"][0]["title"] == "anon can read patients"
    assert "None reported." in Report(outcomes=(COUNTS,)).to_markdown()


def test_markdown_json_and_html_read_correctly(tmp_path: Path) -> None:
    report = Report(
        outcomes=(COUNTS, BAD_SUMS, MISSING_INDEX),
        generated_at=WHEN,
        run_id="run-42",
        duration_s=1.5,
        seed=9,
        source="source 127.0.0.1:5432 (self-hosted)",
        target="target db.x.supabase.co:5432 (direct)",
    )
    paths = report.write(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "verification_report.html",
        "verification_report.json",
        "verification_report.md",
    ]

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Migration verification: FAIL\n")
    assert "run run-42" in markdown and "sample seed 9" in markdown
    assert "| public.patients | 1200 | 1200 | 3 | 1 range differs | 1 | 2 | FAIL |" in markdown
    assert "| public.patients | checksums_match | ERROR |" in markdown
    assert "| public.patients | index | patients_name_idx | missing on target |" in markdown
    for section in ("## Tables", "## Failures", "## Schema differences", "## Timings"):
        assert section in markdown

    data = json.loads(paths["json"].read_text())
    assert data["status"] == "FAIL" and data["passed"] is False
    assert data["summary"] == {
        "tables": 1,
        "checks": 3,
        "failed_error": 1,
        "failed_warn": 1,
        "security_findings": 0,
    }
    assert data["checks"][1]["details"]["partitions_to_rerun"] == ["000001"]
    assert data["timings_s"]["checksums_match"] == 0.25

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert '<span class="fail">FAIL</span>' in page
    assert "<td>public.patients</td>" in page and "<td>1200</td>" in page
    assert "<script" not in page and "<link" not in page


def test_html_escapes_names() -> None:
    hostile = _outcome("row_count_matches", table='public."<script>alert(1)</script>"')
    page = Report(outcomes=(hostile,)).to_html()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_check_metadata_renders_counts_and_tables() -> None:
    metadata = outcome_metadata(BAD_SUMS)
    assert isinstance(metadata["ranges_verified"], dg.IntMetadataValue)
    assert metadata["ranges_verified"].value == 3
    assert metadata["partitions_to_rerun"].value == "000001"
    table = metadata["mismatches"].value
    assert isinstance(metadata["mismatches"], dg.MarkdownMetadataValue)
    assert "| partition_key | key_range | source_rows | target_rows | changed |" in table
    assert "| 000001 | [500, 1000) | 500 | 500 | id=7 (ssn) |" in table
    assert metadata["duration_s"].value == 0.25


def test_two_writers_of_the_report_at_once_both_write_a_whole_set(tmp_path):
    """`verify` beside `run`'s own verification: every writer used the one temporary name
    verification_report.html.tmp, so the first rename took the other's file and the other
    failed ("could not be written; give a writable directory"). Forced: a FIFO at that name
    holds a writer that uses it in open(2) until both have arrived."""
    import os
    import threading
    import time

    fifo = tmp_path / "verification_report.html.tmp"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def write(run_id: str) -> None:
        try:
            Report(outcomes=(COUNTS, SUMS), generated_at=WHEN, run_id=run_id).write(tmp_path)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(r,), daemon=True) for r in ("a", "b")]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    if any(w.is_alive() for w in writers):  # held at the FIFO: let them write
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
            try:
                os.read(reader, 1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
        os.close(reader)
    for writer in writers:
        writer.join(10)
    assert not errors, errors
    assert json.loads((tmp_path / "verification_report.json").read_text())
    assert (tmp_path / "verification_report.md").read_text()
