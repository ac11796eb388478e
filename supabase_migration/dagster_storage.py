"""Dagster's SQLite storages, each reusing one SQLAlchemy engine and its connections per process.

Dagster's SQLite run, schedule and event-log storages make a new SQLAlchemy engine for every
operation, with `NullPool`: every event a run writes, every status change, every partition it
plans costs a new engine (its dialect, its first-connect set-up), a new SQLite connection and
its close, which in WAL mode checkpoints the log into the database when it is the process's
last connection. About 6.5 ms of CPU per event, and a first load stores several hundred: over
2 s of our client CPU (docs/benchmark.md). These subclasses keep Dagster's storage code, tables
and files as they are, and reuse one engine per process and file with a small pool of idle
connections (never a limit on how many are open at once, as before). Before the process forks
(our copy workers), idle connections are closed, so a child never inherits an open SQLite
connection (SQLite forbids using one across fork); the child makes its own engine.
`dagster.yaml` selects these classes.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log import (
    ConsolidatedSqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from sqlalchemy import Connection, Engine, create_engine

# Idle connections kept per engine; more are opened when threads need them, and closed after use.
IDLE_CONNECTIONS = 3


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
                _engines.add(engine)
                cached = (pid, engine)
                self._engine_of_process = cached
        return cached[1]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._engine().connect() as conn, conn.begin():
            yield conn


_creating = threading.Lock()
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def close_idle_connections() -> None:
    """Close every engine's idle SQLite connections in this process (they reopen on demand)."""
    for engine in list(_engines):
        engine.dispose()


if hasattr(os, "register_at_fork"):
    # The child forgets the parent's engines: it never touches, nor closes, their connections.
    os.register_at_fork(before=close_idle_connections, after_in_child=_engines.clear)
atexit.register(close_idle_connections)  # the last close checkpoints the WAL into the database


class RunStorage(_EnginePerProcess, SqliteRunStorage):
    """`SqliteRunStorage` (runs.db in `base_dir`) with one engine per process."""

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> RunStorage:
        # Dagster's own calls SqliteRunStorage.from_local, which would drop the subclass.
        return cls.from_local(inst_data=inst_data, **config_value)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._transaction() as conn:
            yield conn


class ScheduleStorage(_EnginePerProcess, SqliteScheduleStorage):
    """`SqliteScheduleStorage` (schedules.db in `base_dir`) with one engine per process."""

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> ScheduleStorage:
        return cls.from_local(inst_data=inst_data, **config_value)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._transaction() as conn:
            yield conn


class EventLogStorage(_EnginePerProcess, ConsolidatedSqliteEventLogStorage):
    """`ConsolidatedSqliteEventLogStorage` (one event_log.db in `base_dir` for every run) with
    one engine per process."""

    _connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        with self._transaction() as conn:
            yield conn
