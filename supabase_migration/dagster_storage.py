"""Dagster's SQLite storages, each reusing one SQLAlchemy engine and its connections per process.

Dagster's SQLite run, schedule and event-log storages make a new SQLAlchemy engine for every
operation, with `NullPool`: every event a run writes, every status change, every partition it
plans costs a new engine (its dialect, its first-connect set-up), a new SQLite connection and
its close, which in WAL mode also checkpoints the log into the database whenever no other
connection, of any process, has the file open. About 6.5 ms of CPU per event, and a first load
stores several hundred: about 2 s of our client CPU (docs/benchmark.md). These subclasses keep
Dagster's storage code, tables and file layout, and each reuses one engine per process with
a few idle connections (never a limit on how many are open at once, as before). Their commits
do not wait for the disk (`_commit_without_waiting_for_the_disk`).

SQLite forbids using a connection across `fork`. Before this process forks (the CLI forks its
copy workers), idle connections are closed, and the child forgets the parent's engines and
makes its own. A connection another thread has in use at that moment would still be inherited:
the CLI forks only while it runs no other thread (`commands.start_method`).
`dagster.yaml` selects these classes. The commands make a new DAGSTER_HOME's storages again
when a Ctrl-C cut their creation short (`holds_nothing`, `remove_storages`): Dagster makes a
missing file's tables only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import StringSource
from dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log import (
    ConsolidatedSqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from sqlalchemy import Connection, Engine, create_engine, event

# Idle connections kept per engine; more are opened when threads need them, and closed after use.
IDLE_CONNECTIONS = 3

_creating = threading.Lock()
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # this process's, for closing before fork


class _EnginePerProcess:
    """One engine for this storage's SQLite file in each process that uses it."""

    _conn_string: str
    _connect_args: Mapping[str, Any] = {}
    _engine_of_process: tuple[int, Engine] | None = None

    def _engine(self) -> Engine:
        pid = os.getpid()
        cached = self._engine_of_process
        if cached is not None and cached[0] == pid:
            return cached[1]
        with _creating:
            cached = self._engine_of_process
            if cached is None or cached[0] != pid:
                engine = create_engine(
                    self._conn_string,
                    pool_size=IDLE_CONNECTIONS,
                    max_overflow=-1,  # no limit, as with Dagster's NullPool
                    connect_args=dict(self._connect_args),
                )
                event.listen(engine, "connect", _commit_without_waiting_for_the_disk)
                _engines.add(engine)
                cached = (pid, engine)
                self._engine_of_process = cached
        return cached[1]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._engine().connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        """Closing the instance closes this process's idle connections too."""
        cached = self._engine_of_process
        if cached is not None and cached[0] == os.getpid():
            cached[1].dispose()
        super().dispose()  # type: ignore[misc]


def _commit_without_waiting_for_the_disk(dbapi_connection: Any, _: Any) -> None:
    """WAL's `synchronous=NORMAL`: a commit no longer waits for the disk (SQLite's default,
    FULL, did for each of the hundreds of events a first load stores, ~1 ms each). A crash of
    any process loses nothing; a power cut may lose the last events, never corrupt the file.
    What a migration has done is recorded on the target, not here."""
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def close_idle_connections() -> None:
    """Close every engine's idle SQLite connections in this process (they reopen on demand)."""
    for engine in list(_engines):
        engine.dispose()


def _forget_parents_engines() -> None:
    global _creating
    _creating = threading.Lock()  # in case another thread held it at the fork
    _engines.clear()  # never touched, nor closed, here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=close_idle_connections, after_in_child=_forget_parents_engines)
atexit.register(close_idle_connections)  # the last close checkpoints the WAL into the database


class _InDagsterLayout(_EnginePerProcess):
    """Run and schedule storages configured by DAGSTER_HOME (`dagster_home`), their files where
    Dagster's defaults put them: history/runs.db and schedules/schedules.db. (Dagster's own
    `base_dir` cannot be derived from an environment variable in dagster.yaml; and `dagster
    instance migrate` moves a runs.db it finds one directory above the run storage's.)"""

    _subdirectory: str

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"dagster_home": StringSource}

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> Any:
        # Dagster's own calls SqliteRunStorage.from_local by name, which would drop the subclass.
        base_dir = os.path.join(config_value["dagster_home"], cls._subdirectory)
        return cls.from_local(inst_data=inst_data, base_dir=base_dir)  # type: ignore[attr-defined]

    connect = _EnginePerProcess._transaction  # Dagster's: a transaction on our engine


class RunStorage(_InDagsterLayout, SqliteRunStorage):
    """`SqliteRunStorage` with one engine per process."""

    _subdirectory = "history"


class ScheduleStorage(_InDagsterLayout, SqliteScheduleStorage):
    """`SqliteScheduleStorage` with one engine per process."""

    _subdirectory = "schedules"


class EventLogStorage(_EnginePerProcess, ConsolidatedSqliteEventLogStorage):
    """`ConsolidatedSqliteEventLogStorage` (one event_log.db in `base_dir` for every run) with
    one engine per process."""

    _connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}

    _connect = _EnginePerProcess._transaction  # Dagster's: a transaction on our engine

    def has_table(self, table_name: str) -> bool:
        # Asked on every dynamic-partition operation and tagged event; Dagster's own makes an
        # engine each time.
        engine = self._engine()
        with engine.connect() as conn:
            return bool(engine.dialect.has_table(conn, table_name))


# What these storages keep in DAGSTER_HOME: the event log's file (with its -wal and -shm
# files) and the run and schedule storages' directories.
_EVENT_LOG = "event_log.db"
_DIRECTORIES = (RunStorage._subdirectory, ScheduleStorage._subdirectory)


def storages_exist(home: Path) -> bool:
    return (home / _EVENT_LOG).exists() or any((home / d).exists() for d in _DIRECTORIES)


def holds_nothing(home: Path) -> bool:
    """No run and no event recorded in the home's storages (what cannot be read is taken to
    hold something): storages a Ctrl-C left half made may be made again."""
    for path, table in (
        (home / _EVENT_LOG, "event_logs"),
        (home / RunStorage._subdirectory / "runs.db", "runs"),
    ):
        if not path.exists():
            continue
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                made = db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
                ).fetchone()
                if made and db.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]:
                    return False
        except sqlite3.Error:
            return False
    return True


def remove_storages(home: Path) -> None:
    for path in home.iterdir():
        if path.name.startswith(_EVENT_LOG):
            path.unlink()
        elif path.name in _DIRECTORIES and path.is_dir():
            shutil.rmtree(path)
