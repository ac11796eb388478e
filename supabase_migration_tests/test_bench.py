"""The README's benchmark command, at toy size: it runs, checks itself and prints the ratios.

Timings are never asserted; this only keeps `bench/run.py` working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .testbed import require

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_benchmark_runs_and_reports_ratios(pg_binaries, tmp_path: Path) -> None:
    require(pg_binaries.supports_ssl, "the benchmark's target needs PostgreSQL with SSL")
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--rows", "3000", "--only", "ade", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(d)/(a): our run vs pg_dump \\| psql" in done.stdout  # a Markdown cell
    (result,) = out.glob("compare_*.json")
    report = json.loads(result.read_text())
    assert report["ratios"]["(d)/(a): our run vs pg_dump | psql"] > 0
    assert report["ratios"]["(e)/(d): verify vs our run"] > 0
    assert all(row["ok"] for row in report["rows"]), report["rows"]
