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
    """Through the relay that stands in for a far target (`--target-rtt-ms`; the relay itself
    is tested below): one run of the harness covers both, at half the suite's time."""
    require(pg_binaries.supports_ssl, "the benchmark's target needs PostgreSQL with SSL")
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--rows", "3000", "--only", "adeg", "--out", str(out),
         "--target-rtt-ms", "20"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(d)/(a): our run vs pg_dump \\| psql" in done.stdout  # a Markdown cell
    assert "relay adding 20 ms to every round trip" in done.stdout
    (result,) = out.glob("compare-rtt20ms_*.json")
    report = json.loads(result.read_text())
    assert report["ratios"]["(d)/(a): our run vs pg_dump | psql"] > 0
    assert report["ratios"]["(e)/(d): verify vs our run"] > 0
    assert report["ratios"]["(g)/(d): verify straight after the load vs first run"] > 0
    (verify,) = (row for row in report["rows"] if row["key"] == "e")
    assert verify["note"].startswith("target settled first (VACUUM (ANALYZE), ")
    assert all(row["ok"] for row in report["rows"]), report["rows"]


def test_the_relay_delays_every_round_trip_and_keeps_the_stream(target_db) -> None:
    """bench/latency.py stands in for a remote target: each round trip through it takes at
    least the added time, and a COPY's rows all arrive."""
    import time

    import psycopg

    port = int(target_db.url.split("@127.0.0.1:", 1)[1].split("/", 1)[0])
    relay = subprocess.Popen(
        [sys.executable, str(BENCH.parent / "latency.py"), str(port), "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        far = int(relay.stdout.readline())
        url = target_db.url.replace(f"@127.0.0.1:{port}/", f"@127.0.0.1:{far}/")
        with psycopg.connect(url, autocommit=True) as conn:
            started = time.monotonic()
            for _ in range(3):
                conn.execute("SELECT 1")
            assert time.monotonic() - started >= 3 * 0.2  # 100 ms each way, never sooner
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY (SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g) TO STDOUT"
                ) as copy,
            ):
                received = sum(len(block) for block in copy)
            assert received > 20000 * 100
    finally:
        relay.terminate()
        relay.wait(30)
