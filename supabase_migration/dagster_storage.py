"""Dagster's SQLite storages, each reusing one SQLAlchemy engine per process.

Dagster's SQLite run, schedule and event-log storages make a new SQLAlchemy engine for every
operation: every event a run writes, every status change, every partition it plans. Making an
engine (its dialect, its first-connect set-up) cost about 5 ms of CPU each time, and a first load
performs several hundred such operations in the CLI and its workers: about 1.2 s of our client
CPU (docs/benchmark.md). These subclasses keep Dagster's storage code, tables and files as they
are and reuse one engine per process instead: the pool stays `NullPool` (a new SQLite connection
per operation, as before, so threads and processes never share one), and a forked worker makes
its own engine. `dagster.yaml` selects them.
"""

from __future__ import annotations

import os
import threading
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
from sqlalchemy.pool import NullPool


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
                    self._conn_string, poolclass=NullPool, connect_args=dict(self._connect_args)
                )
                cached = (pid, engine)
                self._engine_of_process = cached
        return cached[1]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._engine().connect() as conn, conn.begin():
            yield conn


_creating = threading.Lock()


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
