"""Dagster's SQLite storages as our dagster.yaml configures them: one engine per process."""

from __future__ import annotations

import multiprocessing
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.event_log.sqlite import consolidated_sqlite_event_log

from supabase_migration import commands, dagster_storage

real_connect = sqlite3.dbapi2.connect


def _events(instance: dg.DagsterInstance, key: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey(key), limit=1000).records)


def test_a_new_home_makes_one_engine_per_storage_for_every_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    real = dagster_storage.create_engine

    def counting(url: str, **kwargs: object):
        made.append(Path(url).name)
        return real(url, **kwargs)

    monkeypatch.setattr(dagster_storage, "create_engine", counting)
    opened: list[object] = []
    monkeypatch.setattr(  # what SQLAlchemy's SQLite dialect calls
        sqlite3.dbapi2, "connect", lambda *a, **k: opened.append(a) or real_connect(*a, **k)
    )
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = commands.dagster_instance()
    opened.clear()  # creating the files used Dagster's own engines
    assert isinstance(instance.run_storage, dagster_storage.RunStorage)
    assert isinstance(instance.event_log_storage, dagster_storage.EventLogStorage)
    assert isinstance(instance.schedule_storage, dagster_storage.ScheduleStorage)

    # As our table assets are: dynamic partitions (each operation asks the event log whether
    # a table exists) and an asset check.
    ranges = dg.DynamicPartitionsDefinition(name="ranges")

    @dg.asset(partitions_def=ranges, check_specs=[dg.AssetCheckSpec("fine", asset="numbers")])
    def numbers():
        yield dg.Output(None)
        yield dg.AssetCheckResult(passed=True)

    instance.add_dynamic_partitions("ranges", ["a", "b", "c"])
    for key in ("a", "b", "c"):
        assert dg.materialize([numbers], instance=instance, partition_key=key).success
    for n in range(20):
        instance.report_runless_asset_event(dg.AssetMaterialization("side", partition=str(n)))

    assert _events(instance, "numbers") == 3 and _events(instance, "side") == 20
    assert len(instance.get_runs()) == 3
    # Hundreds of storage operations above; Dagster's own classes made an engine for each.
    counts = Counter(made)
    assert counts["runs.db"] == 1 and counts["event_log.db"] == 1, counts
    assert counts["schedules.db"] <= 1, counts
    # ... and a new SQLite connection and its close for each; now a few are kept and reused.
    assert len(opened) <= 3 * dagster_storage.IDLE_CONNECTIONS, Counter(map(str, opened))
    # Commits do not wait for the disk (WAL, synchronous=NORMAL), in every storage.
    for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        with storage._engine().connect() as conn:  # type: ignore[attr-defined]
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    # Files where Dagster's defaults put them.
    assert {str(p.relative_to(home)) for p in home.rglob("*.db")} == {
        "history/runs.db",
        "schedules/schedules.db",
        "event_log.db",
    }

    # Another process (the UI, a second CLI) opening the same home sees all of it.
    with dg.DagsterInstance.from_config(str(home)) as again:
        assert _events(again, "side") == 20 and len(again.get_runs()) == 3
        engine = again.event_log_storage._engine()  # type: ignore[attr-defined]
        assert engine.pool.checkedin() >= 1
    assert engine.pool.checkedin() == 0  # closing the instance closed its idle connections


_inherited: dg.DagsterInstance | None = None


def _write_from_forked_child(done: multiprocessing.SimpleQueue) -> None:
    assert _inherited is not None
    storage = _inherited.event_log_storage
    parents = storage._engine_of_process
    assert parents is not None
    inherited_idle = parents[1].pool.checkedin()  # type: ignore[attr-defined]
    _inherited.report_runless_asset_event(dg.AssetMaterialization("forked"))
    done.put((inherited_idle, storage._engine_of_process is not parents))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
def test_a_forked_worker_makes_its_own_engine(tmp_path: Path, monkeypatch) -> None:
    """Our copy workers are forked from the CLI: a child inherits no open SQLite connection
    (SQLite forbids using one across fork) and makes its own engine. (The workers open an
    instance of their own; this child even uses the one it inherited.)"""
    global _inherited
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    _inherited = commands.dagster_instance()
    try:
        _inherited.report_runless_asset_event(dg.AssetMaterialization("forked"))
        engine = _inherited.event_log_storage._engine()  # type: ignore[attr-defined]
        assert engine.pool.checkedin() >= 1  # an idle connection, kept for the next event
        context = multiprocessing.get_context("fork")
        done = context.SimpleQueue()
        child = context.Process(target=_write_from_forked_child, args=(done,))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
        assert done.get() == (0, True)  # nothing open inherited; a new engine in the child
        assert _events(_inherited, "forked") == 2
    finally:
        _inherited = None


def test_a_home_whose_creation_was_cut_short_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C as the first command made the storages left event_log.db without its tables:
    Dagster makes a missing file's tables only, so every later command failed with a page of
    SQLAlchemy. The storages' creation is marked until it ends; a home still marked is made
    again (it holds no run yet). A half-made one from before the mark is one sentence."""
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    commands.dagster_home()
    assert home.stat().st_mode & 0o777 == 0o700  # its event log names rows by key

    def cut_short(*_: object) -> None:  # the Ctrl-C, once the file is there
        raise KeyboardInterrupt

    # What the event log storage calls once its engine has made the file, before its tables.
    monkeypatch.setattr(consolidated_sqlite_event_log, "check_alembic_revision", cut_short)
    with pytest.raises(KeyboardInterrupt):
        commands.dagster_instance(home)
    monkeypatch.undo()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert (home / "event_log.db").exists()
    instance = commands.dagster_instance(home)
    assert instance.event_log_storage.supports_asset_checks
    assert not (home / ".supabase-migration.creating").exists()
    instance.report_runless_asset_event(dg.AssetMaterialization("kept"))
    assert _events(commands.dagster_instance(home), "kept") == 1  # made once, then kept
    # A mark left after the storages were made (a Ctrl-C just before it was cleared), then
    # the UI, which takes no lock, recorded events: they are kept.
    (home / ".supabase-migration.creating").touch()
    assert _events(commands.dagster_instance(home), "kept") == 1
    assert not (home / ".supabase-migration.creating").exists()

    # A mark beside storages that cannot be read (not SQLite, or unreadable): taken to hold
    # something, so kept as they are, and said in one sentence instead of being made again.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "event_log.db").write_bytes(b"not an SQLite file, but maybe someone's runs")
    (damaged / ".supabase-migration.creating").touch()
    assert not dagster_storage.holds_nothing(damaged)
    monkeypatch.setenv("DAGSTER_HOME", str(damaged))
    with pytest.raises(commands.ConfigError, match="could not be opened"):
        commands.dagster_instance(commands.dagster_home())
    assert (damaged / "event_log.db").read_bytes().startswith(b"not an SQLite file")

    older = tmp_path / "older"  # as a release without the mark left it
    older.mkdir()
    (older / "event_log.db").write_bytes(b"")
    monkeypatch.setenv("DAGSTER_HOME", str(older))
    with pytest.raises(commands.ConfigError, match="could not be opened"):
        commands.dagster_instance(commands.dagster_home())
