"""The programmatic API behind `supabase-migrate`: init, plan, run, resume, status.

Runs go through the same Dagster definitions as the UI and are recorded in the `DAGSTER_HOME`
instance, so a CLI migration shows up in `dagster dev` with its partitions and checks. No daemon
is needed: each unit of work (one table, a contiguous span of its ranges) is executed in-process,
by up to `workers` processes at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import psycopg
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from . import assets, checkpoints, memory
from . import manifest as manifest_io
from .assets import (
    COMMAND_TAG,
    EXIT_CODE_METADATA,
    INDEXES_KEY,
    INTERRUPTED_METADATA,
    MATVIEWS_KEY,
    PARTITIONS_PER_RUN,
    PID_TAG,
    PLAN_KEY,
    SCHEMA_KEY,
    SEQUENCES_KEY,
    TARGET_POOL,
    is_interruption,
    live_tables,
    partitions_def_name,
    started_by_the_cli,
    table_asset_key,
)
from .catalog import needs_bytewise_keys
from .checkpoints import Status
from .checks import REPORT_CHECK, REPORT_KEY
from .connections import (
    borrowed,
    close_kept,
    retrying,
    side_by_side,
    warn_if_workers_exceed_pool,
)
from .copy import CopyOptions, changed_or_unfinished, collided
from .definitions import build_definitions
from .errors import (
    ConfigError,
    InterruptedBeforeCopying,
    MigrationError,
    VerificationInterrupted,
    listed,
)
from .inputs import (
    Settings,
    check_connections,
    ensure_manifest,
    source_url,
    tables_left_out,
    target_url,
)
from .localpg import pid_alive
from .manifest import Manifest
from .planning import MAX_PARTITIONS_PER_TABLE, FirstPlansAhead, plan_tables
from .preflight import Finding, Severity, removed_from_the_manifest
from .report import read_repair, report_dir
from .resources import default_resources
from .schema_step import preflight, start_schema_ahead
from .security import read_policy_file
from .security_assets import SECURITY_KEY, resolve_policy_file
from .status_command import unrecorded_note

_PACKAGE_DIR = Path(__file__).resolve().parent


# -- Dagster instance ------------------------------------------------------------------------


def dagster_home() -> Path:
    """DAGSTER_HOME (default ./.dagster), made and given our dagster.yaml if new. Cheap: `run`
    checks it before writing anything to the target."""
    # Dagster wants it absolute; a relative one (or ~) would fail only when the instance opens.
    home_path = Path(os.environ.get("DAGSTER_HOME") or ".dagster").expanduser().absolute()
    os.environ["DAGSTER_HOME"] = str(home_path)
    with _home_locked(home_path):
        config = home_path / "dagster.yaml"
        if not config.exists():
            for candidate in (_PACKAGE_DIR / "dagster.yaml", _PACKAGE_DIR.parent / "dagster.yaml"):
                if candidate.exists():
                    config.write_text(_home_config(candidate.read_text(), home_path))
                    break
    try:  # its YAML, its keys and the storage modules' presence (15 ms); a class or its config
        # that cannot be loaded shows only when the instance opens, after `run` has started
        # the schema step
        config, _ = dagster_instance_config(str(home_path))
        for entry in config.values():
            module = entry.get("module") if isinstance(entry, dict) else None
            if module and importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(module)
    except Exception as exc:
        raise _unopenable(home_path, exc) from None
    return home_path


def dagster_instance(home: Path | None = None) -> dg.DagsterInstance:
    """The persistent instance in DAGSTER_HOME, so the UI sees CLI runs (`home`: what
    `dagster_home()` returned, if the caller has it)."""
    home = home or dagster_home()
    # Two first runs on a fresh home would both create Dagster's SQLite tables and one would
    # crash; the file lock makes the second wait for the first to create them.
    # Imported here, as Dagster imports it when it opens the instance: its exit and fork
    # hooks are registered then, as they always were (verify opens it on a thread).
    from . import dagster_storage

    with _home_locked(home):
        creating = home / _CREATING
        if creating.exists():  # a Ctrl-C cut the storages' creation short
            if dagster_storage.holds_nothing(home):  # else the UI used them since: whole
                dagster_storage.remove_storages(home)
            creating.unlink()
        new = not dagster_storage.storages_exist(home)
        if new:
            creating.touch()
        try:
            instance = dg.DagsterInstance.get()
            # Storages are created lazily: create them all under the lock. Dagster would not
            # finish one whose file a Ctrl-C left half made (a new event_log.db without its
            # tables made every later command fail), hence `_CREATING`.
            instance.get_runs(limit=1)
            if not (instance.event_log_storage.supports_asset_checks and instance.schedule_storage):
                raise RuntimeError("incomplete storage")
        except Exception as exc:  # its dagster.yaml: YAML syntax, unknown keys, a missing class
            raise _unopenable(home, exc) from None
        if new:
            creating.unlink()
        return instance


# The mark of the storages' creation in DAGSTER_HOME, until it ends.
_CREATING = ".supabase-migration.creating"


def _unopenable(home: Path, exc: Exception) -> ConfigError:
    # Not the error's text: a storage URL in dagster.yaml may carry a password.
    return ConfigError(
        f"The Dagster instance in DAGSTER_HOME {home} could not be opened "
        f"({type(exc).__name__}); check {home / 'dagster.yaml'}, or point "
        "DAGSTER_HOME at a new directory."
    )


@contextmanager
def _home_locked(home: Path) -> Iterator[None]:
    try:
        # Its event log names rows by key (a verification's findings): this user's alone.
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(home / ".supabase-migration.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    except OSError as exc:  # not a directory, not writable, no locks (NFS), disk full
        raise ConfigError(
            f"DAGSTER_HOME {home} is not a usable directory "
            f"({exc.strerror or type(exc).__name__}); point DAGSTER_HOME at a directory this "
            "user can write."
        ) from None


def _home_config(text: str, home: Path) -> str:
    """Our dagster.yaml for `home`: the storages' directory spelled out, so that tools opening
    the instance without DAGSTER_HOME set (`DagsterInstance.from_config`) find it too."""
    path = json.dumps(str(home.resolve()))
    return _FROM_DAGSTER_HOME.sub(lambda m: f"{m.group(1)}: {path}", text)


_FROM_DAGSTER_HOME = re.compile(r"(\w+):\n\s+env: DAGSTER_HOME\b")


def _quiet_dagster() -> dict[str, Any]:
    # The CLI prints each failure as one sentence itself; Dagster's console lines would repeat
    # it with a stack trace. Everything stays in the instance's event log for the UI.
    logging.getLogger("dagster").setLevel(logging.CRITICAL)
    return {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def release_dead_runs(instance: dg.DagsterInstance) -> int:
    """Fail runs left STARTED by a CLI process that died (e.g. SIGKILL) and free their slots."""
    released = 0
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
        )
    )
    for run in runs:
        pid = run.tags.get(PID_TAG) if started_by_the_cli(run) else None
        if not pid or pid_alive(int(pid)):
            continue
        instance.report_run_failed(run)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released += 1
    return released


def _run_failure(result: dg.ExecuteInProcessResult) -> MigrationError:
    """The failed step's own sentence, as the error class its exit code stands for; Ctrl-C
    in a step is Ctrl-C for the CLI too."""
    failures = result.get_step_failure_events()
    for event in failures:
        data = event.step_failure_data
        retried = data.user_failure_data and data.user_failure_data.metadata.get(
            INTERRUPTED_METADATA
        )  # a retried attempt that found the step interrupted
        if retried or is_interruption(data.error):
            raise KeyboardInterrupt
    for event in failures:
        data = event.step_failure_data
        if data.user_failure_data and data.user_failure_data.description:
            code = data.user_failure_data.metadata.get(EXIT_CODE_METADATA)
            cls = ConfigError if code and code.value == ConfigError.exit_code else MigrationError
            return cls(data.user_failure_data.description)
        if data.error:
            # Not the error's text: a psycopg message carries DETAIL lines with row values.
            root = data.error
            while root.cause is not None:
                root = root.cause
            return MigrationError(
                f"The {event.step_key} step failed unexpectedly ({root.cls_name or 'error'}); "
                "the run in the Dagster UI (DAGSTER_HOME) has the details."
            )
    return MigrationError("the run failed; see the Dagster UI for the step that failed.")


def _materialize(
    defs: dg.Definitions,
    keys: Sequence[dg.AssetKey],
    instance: dg.DagsterInstance,
    command: str,
    *,
    run_config: dict | None = None,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    assets = [defs.get_assets_def(k) for k in keys]
    config = {**_quiet_dagster(), **(run_config or {})}
    return dg.materialize(
        assets,
        instance=instance,
        resources=default_resources(),
        run_config=config,
        tags={PID_TAG: str(os.getpid()), COMMAND_TAG: command, **(tags or {})},
        raise_on_error=False,
    )


def _wait_for_a_target_slot(instance: dg.DagsterInstance, log: Callable[[str], None]) -> None:
    """Until a slot of the target's pool is free. Dagster holds Ctrl-C and SIGTERM while a
    run waits for one, until a step starts: a run of ours finding every slot taken (by another
    migration in this DAGSTER_HOME, or runs a killed CLI left) could not be stopped. Here a
    signal stops it, and runs of dead processes give their slots back."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    told = False
    while True:
        info = storage.get_concurrency_info(TARGET_POOL)
        limit = info.slot_count or info.limit  # the default limit, until a step makes the slots
        # As Dagster admits a step: a slot is free while the slots outnumber the steps it has
        # assigned one, whether or not they have claimed it yet (counting claims alone, a run
        # of ours went on into Dagster's own wait, which holds SIGTERM).
        taken = max(info.active_slot_count, info.assigned_step_count)
        if not limit or taken < limit:
            return
        if not told:
            held = ", ".join(sorted(info.active_run_ids | info.assigned_run_ids)[:3])
            log(
                f"Waiting for a slot of the {TARGET_POOL} pool: all {limit} are held by other "
                f"runs in this DAGSTER_HOME ({held}; another migration?)."
            )
            told = True
        release_dead_runs(instance)
        time.sleep(0.5)


def _run_setup_assets(
    defs: dg.Definitions, keys: Sequence[dg.AssetKey], instance: dg.DagsterInstance, command: str
) -> None:
    """One Dagster run for several unpartitioned assets (in dependency order): each run costs
    over a second of fixed overhead."""
    result = _materialize(defs, keys, instance, command)
    if not result.success:
        raise _run_failure(result)


# -- plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanReport:
    findings: list[Finding]
    tables: list[tuple[str, str, int, str]]  # name, key kind, ranges, note

    @property
    def has_errors(self) -> bool:
        return any(f.severity == Severity.ERROR for f in self.findings)


def plan(settings: Settings, log: Callable[[str], None] = lambda _: None) -> PlanReport:
    """Preflight plus the ranges each table would get; writes nothing on the target."""
    check_connections(log)  # a source too old to read is one sentence, as for `run`
    manifest = ensure_manifest(settings, log)
    findings = preflight(manifest, source_url(), target_url())
    rows = []
    with (
        borrowed(source_url()) as source,
        borrowed(target_url()) as target,
    ):
        bytewise = needs_bytewise_keys(source, target)
        infos = live_tables(source, [t.name for t in manifest.tables])
        planned = checkpoints.summary_if_planned(target)
    plans = plan_tables(
        lambda: borrowed(source_url()),
        [
            (infos[t.name], manifest.batch_size_for(t))
            for t in manifest.tables
            if t.name not in planned
        ],
        max_partitions=MAX_PARTITIONS_PER_TABLE,
        collate_c=bytewise,
    )
    for entry in manifest.tables:
        info = infos[entry.name]
        note = "whole table, replaced atomically" if not info.key else ", ".join(info.key)
        if entry.name in planned:  # `run` keeps them: a new batch size makes only new ones
            ranges = sum(planned[entry.name][s] for s in ("completed", "pending", "failed"))
            note += (
                "; planned by an earlier run: its ranges are kept, and only its last one is "
                "split if it grew past the batch size"
            )
        else:
            ranges = len(plans[entry.name])
        rows.append((entry.name, str(info.key_kind), ranges, note))
    return PlanReport(findings=findings, tables=rows)


# -- run / resume ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A contiguous span of one table's partitions, executed as one Dagster run."""

    table: str
    first: str
    last: str
    count: int
    resync: bool = False  # re-sync even ranges whose source is unchanged (`run --repair`)


@dataclass
class RunSummary:
    tables: dict[str, dict[str, int]]
    failures: list[str]
    duration_s: float
    verified: bool | None = None  # None: verification was not run
    report_dir: Path | None = None

    @property
    def copied(self) -> bool:
        return not self.failures and all(
            t["pending"] == 0 and t["failed"] == 0 for t in self.tables.values()
        )

    @property
    def ok(self) -> bool:
        return self.copied and self.verified is not False


def make_units(
    table: str, keys: Sequence[str], todo: set[str] | None, *, resync: bool = False
) -> list[Unit]:
    """Split the table's keys (in partition order) into runs of at most PARTITIONS_PER_RUN,
    keeping only contiguous spans of keys in `todo` (None = every key)."""
    units: list[Unit] = []
    span: list[str] = []

    def close() -> None:
        if span:
            units.append(Unit(table, span[0], span[-1], len(span), resync))
            span.clear()

    for key in keys:
        if todo is not None and key not in todo:
            close()
            continue
        span.append(key)
        if len(span) >= PARTITIONS_PER_RUN:
            close()
    close()
    return units


def execute_unit(defs: dg.Definitions, instance: dg.DagsterInstance, unit: Unit) -> str | None:
    """Run one unit; None when it succeeded, else the failed step's one PHI-free sentence."""
    key = table_asset_key(unit.table)
    op_name = defs.get_assets_def(key).op.name
    tags = (
        {}
        if unit.first == unit.last
        else {ASSET_PARTITION_RANGE_START_TAG: unit.first, ASSET_PARTITION_RANGE_END_TAG: unit.last}
    )
    assets = [defs.get_assets_def(key)]

    def materialize() -> dg.ExecuteInProcessResult:
        return dg.materialize(
            assets,
            instance=instance,
            resources=default_resources(),
            run_config={**_quiet_dagster(), "ops": {op_name: {"config": {"resync": unit.resync}}}},
            partition_key=unit.first if unit.first == unit.last else None,
            tags={PID_TAG: str(os.getpid()), COMMAND_TAG: "run", **tags},
            raise_on_error=False,
        )

    try:
        result = materialize()
    except dg.DagsterInvalidInvocationError:
        # The unit's partition keys are gone from the instance: a plan of another target
        # sharing this DAGSTER_HOME replaced them with its own. They are this target's.
        _add_back_partitions(instance, unit)
        try:
            result = materialize()
        except dg.DagsterInvalidInvocationError:
            raise MigrationError(
                f"Dagster no longer knows partitions {unit.first} to {unit.last} of "
                f"{unit.table}: a migration of another target shares this DAGSTER_HOME and "
                "planned meanwhile; give each target a DAGSTER_HOME of its own, and run again."
            ) from None
    return None if result.success else _run_failure(result).message


def _add_back_partitions(instance: dg.DagsterInstance, unit: Unit) -> None:
    with borrowed(target_url()) as target:
        keys = [cp.partition_key for cp in checkpoints.load(target, unit.table)]
    instance.add_dynamic_partitions(
        partitions_def_name(unit.table), [k for k in keys if unit.first <= k <= unit.last]
    )


# The parent's definitions, set before it forks its workers: a forked worker uses them as they
# are, and a spawned one (not on Linux) builds its own once.
_parent_definitions: dg.Definitions | None = None
_worker_context: tuple[dg.Definitions, dg.DagsterInstance] | None = None


# Set by the CLI when it stops its workers: a worker starts no further unit (Workers.stop).
_stopping: Any = None
# Set in a worker that saw Ctrl-C: idle (its own handler), or in a run it then ended.
_interrupted = False
# How long a stopping CLI waits for its workers to end their runs (a range rolls back in
# milliseconds) before it kills them; a killed range is rolled back by its server all the same.
STOP_GRACE_S = 5.0


def _worker_init(stopping: Any) -> None:
    """Workers die with the CLI: a SIGKILLed run must not leave copies running behind it.

    Ctrl-C reaches the terminal's whole process group, and the CLI says what happened, once.
    A busy worker is inside a Dagster run, whose own handler takes the signal: the range rolls
    back and the step stops for good (`assets.interruptible`). An idle one notes it and stays:
    leaving there and then could take the pool's queue lock with it, on which its sibling,
    done with its run, would wait for ever (and the CLI for the sibling). Either starts no
    further unit; the CLI stops the pool."""
    global _stopping
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    signal.signal(signal.SIGINT, _note_interrupt)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with it
    _stopping = stopping
    assets.cli_stopping = stopping
    _quiet_dagster()


def _note_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True


def _worker_ready(manifest_path: str) -> None:
    """A worker's warm-up while the parent runs the schema step: definitions and its own
    instance (the parent's SQLite handles are not shared across processes)."""
    global _worker_context
    if _worker_context is None:
        defs = _parent_definitions or build_definitions(manifest_io.read(Path(manifest_path)))
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)
        _worker_context = (defs, instance)


class Workers:
    """Copy workers, started before the schema step when there is copying to do.

    On Linux they are forked from the CLI once Dagster is imported and the definitions built, so
    a worker is ready in about 0.1 s; spawned (elsewhere), each spends 2-4 s importing Dagster,
    which then overlaps the schema step instead of delaying the first copy. The CLI forks while
    no other thread runs (the plans read ahead have finished); a child leaves the connections
    it inherits to its parent (`connections._forget_inherited`). See `start_method`.
    """

    def __init__(
        self,
        count: int,
        defs: dg.Definitions,
        manifest_path: Path | None,
        instance: dg.DagsterInstance | None = None,
    ) -> None:
        self.count = count
        self.defs = defs
        self.instance = instance  # where the runs of killed workers are marked failed
        self.manifest_path = str(manifest_path)
        self._pool: ProcessPoolExecutor | None = None
        self._stopping: Any = None
        self._others: list[Any] = []  # this process's children that are not the pool's

    def start(self) -> ProcessPoolExecutor | None:
        if self.count > 1 and self._pool is None:
            global _parent_definitions
            method = start_method()
            _parent_definitions = self.defs if method == "fork" else None
            context = multiprocessing.get_context(method)
            self._others = multiprocessing.active_children()
            self._stopping = context.Event()
            self._pool = ProcessPoolExecutor(
                self.count,
                mp_context=context,
                initializer=_worker_init,
                initargs=(self._stopping,),
            )
            # The pool forks on its first submit (see memory.py).
            with memory.frozen_while_forking():
                for _ in range(self.count):
                    self._pool.submit(_worker_ready, self.manifest_path)
        return self._pool

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            # Wait for idle workers to exit (milliseconds): an executor thread left running
            # at interpreter exit can make Python 3.11 print a "Bad file descriptor" traceback
            # after the CLI's one sentence.
            self._pool.shutdown(wait=True, cancel_futures=True)
        else:  # Ctrl-C, or a failure: a worker may be busy, or blocked by one that died
            self.stop()

    def stop(self) -> int:
        """No unit starts any more, running ones have STOP_GRACE_S to end their runs (on
        Ctrl-C, theirs stop on the same signal from the terminal; a signal sent to the CLI
        alone reaches them as the stop event, which a table run reads between ranges), then
        the workers left are killed; returns how many. A second Ctrl-C kills at once."""
        assert self._pool is not None
        workers = [p for p in multiprocessing.active_children() if p not in self._others]
        # The pool's thread that reaps the workers: joined last (shutdown forgets it).
        reaper = getattr(self._pool, "_executor_manager_thread", None)
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        # A worker has ended once its sentinel is ready, whichever thread reaps it (the pool's
        # own thread joins them too).
        running = {worker.sentinel: worker for worker in workers}
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            while running and (left := deadline - time.monotonic()) > 0:
                for ended in multiprocessing.connection.wait(list(running), timeout=left):
                    running.pop(ended)  # type: ignore[call-overload]
        finally:
            for worker in running.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            if reaper is not None:  # every worker has ended or is killed: at once
                reaper.join()
            if running and self.instance is not None:
                # Their runs stay STARTED, holding the target pool's slots: a run started
                # beside this one would wait on them for ever.
                with contextlib.suppress(Exception):  # a second Ctrl-C, a locked SQLite
                    release_dead_runs(self.instance)
        return len(running)


def start_method() -> str:
    """fork where it is safe: on Linux, and only while this process runs no other thread (one
    could hold a lock, a logging or SQLite one, that the child would then wait on forever)."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _copying_ahead() -> bool:
    """Whether this run will copy: nothing planned yet, or ranges not completed."""
    with borrowed(target_url()) as target:
        if not checkpoints.bookkeeping_exists(target):
            return True
        tables = checkpoints.summary(target)
    return not tables or any(t["pending"] or t["failed"] for t in tables.values())


def _worker_execute(manifest_path: str, unit: Unit) -> str | None:
    global _interrupted
    if _interrupted or (_stopping is not None and _stopping.is_set()):
        raise KeyboardInterrupt  # queued before the interrupt
    _worker_ready(manifest_path)
    assert _worker_context is not None
    defs, instance = _worker_context
    try:
        return execute_unit(defs, instance, unit)
    except KeyboardInterrupt:
        _interrupted = True
        raise
    finally:
        # Dagster gives SIGTERM the SIGINT handler as a run ends: the pool stops a worker
        # with SIGTERM, which must end it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(
    settings: Settings,
    *,
    resume: bool = False,
    progress: Callable[[dict[str, dict[str, int]]], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> RunSummary:
    """Schema, plan, every range that is not done (or changed), then sequences."""
    reached: list[str] = []  # "planned", once the setup run has planned the ranges
    reviewed = manifest_io.text_if_present(settings.manifest_path)
    try:
        return _run(settings, resume, progress, log, reached)
    except BaseException as exc:
        if not reached and manifest_io.put_back(settings.manifest_path, reviewed):
            # The flags that changed it were refused, or the run stopped before planning: the
            # manifest users review and commit stays what they reviewed.
            log(f"Put {settings.manifest_path} back as it was before this run.")
        # `resume` has checked that a run planned the target: resuming is still right.
        if not isinstance(exc, KeyboardInterrupt):
            raise
        if reached or resume or isinstance(exc, VerificationInterrupted):
            raise
        raise InterruptedBeforeCopying from None


def _run(
    settings: Settings,
    resume: bool,
    progress: Callable[[dict[str, dict[str, int]]], None] | None,
    log: Callable[[str], None],
    reached: list[str],
) -> RunSummary:
    started = time.monotonic()
    check_connections(log)
    _check_the_source(settings.new_source, log)
    _refuse_tables_dropped_since_copied(settings.manifest_path)
    if resume:
        _refuse_nothing_to_resume(settings.manifest_path)
    warning = warn_if_workers_exceed_pool(target_url(), settings.workers)
    if warning:
        log(warning)
    manifest = ensure_manifest(settings, log)
    with borrowed(target_url()) as target:
        left_out, removed = removed_from_the_manifest(target, tables_left_out(manifest))
    if left_out:  # verify fails on them; the user should hear it before the copy, not after
        log(manifest.left_out_sentence(left_out))
    if removed:
        log(manifest.removed_sentence(removed))
    home = dagster_home()  # an unusable DAGSTER_HOME stops the run before the schema is written
    policy_file = resolve_policy_file(None)  # and so does a policy file the end cannot read
    if policy_file is not None:
        read_policy_file(policy_file)
    repair: dict[str, set[str]] = {}
    if settings.repair:
        found = read_repair(report_dir(), target_url().identity)
        repair = found.ranges
        count = sum(len(keys) for keys in repair.values())
        log(f"Repairing {count} range(s) named by {found.report} (of {found.generated_at}).")
        unknown = sorted(set(repair) - {t.name for t in manifest.tables})
        if unknown:
            log(f"Not in the manifest, so not repaired: {', '.join(unknown)}.")
        unchecked = [t.name for t in manifest.tables if t.name not in found.tables]
        if unchecked:
            log(
                f"That report checked {len(manifest.tables) - len(unchecked)} of "
                f"{len(manifest.tables)} tables (`verify --tables`), so {listed(unchecked, 3)} "
                "are not repaired; run `supabase-migrate verify` first to repair every table."
            )
    schema_ahead = start_schema_ahead(manifest, source_url(), target_url())
    first_plans = FirstPlansAhead(
        source_url(),
        target_url(),
        [(m.name, manifest.batch_size_for(m)) for m in manifest.tables],
        manifest.schemas,
    )
    try:
        instance = dagster_instance(home)
        released = release_dead_runs(instance)
        defs = build_definitions(manifest, first_plans, schema_ahead)
    finally:  # no thread may run at the fork
        first_plans.finish()  # cancels what is still read
    if schema_ahead:
        # Not on an error or Ctrl-C above: the CLI ends then, and the schema step, one
        # transaction on a daemon thread's connection, is rolled back unless it had committed.
        # (A caller that goes on in the same process, a test, leaves the step to finish.)
        schema_ahead.wait()  # the setup run would wait for the schema anyway
    if released:
        log(f"Marked {released} run(s) of a stopped migration process as failed.")
    command = "resume" if resume else "run"
    with Workers(settings.workers, defs, manifest.path, instance) as workers:
        if settings.workers > 1 and (repair or _copying_ahead()):
            workers.start()
        _wait_for_a_target_slot(instance, log)
        _run_setup_assets(defs, [SCHEMA_KEY, PLAN_KEY], instance, command)
        reached.append("planned")
        units = _between_steps(lambda: _units_to_run(manifest, instance, resume, repair, log))
        marked_before = _between_steps(lambda: _marked_to_copy_again(manifest)) if units else {}
        unit_failures = _execute_with_progress(
            defs, instance, manifest, units, workers.start() if units else None, progress
        )
        again = (
            _between_steps(lambda: _units_to_copy_again(manifest, instance, marked_before))
            if units
            else []
        )

        def copy_again(more: list[Unit], why: str) -> None:
            nonlocal unit_failures
            log(f"Copying again {sum(u.count for u in more)} range(s) {why}.")
            # A table copied again says anew what failed: its ranges' own failures are in
            # their checkpoints, which a range completed since no longer holds.
            tables = {u.table for u in more}
            unit_failures = [f for f in unit_failures if f[0] not in tables]
            unit_failures += _execute_with_progress(
                defs, instance, manifest, more, workers.start(), progress
            )

        if again:
            copy_again(again, "whose rows were re-synced with another range")
        collisions = _between_steps(lambda: _collisions_across_units(instance, [*units, *again]))
        if collisions:
            copy_again(collisions, "whose unique values other units held")
    failed, tables = _between_steps(lambda: _checkpoints_now({t.name for t in manifest.tables}))
    # A step can also fail where no checkpoint row records it (the target was unreachable
    # when the failure was to be written): its own sentence is then the only explanation.
    recorded = {f.split(" partition ", 1)[0] for f in failed}
    failed += list(
        dict.fromkeys(
            f"{table}: {message}" for table, message in unit_failures if table not in recorded
        )
    )
    if progress is not None:
        progress(tables)
    summary = RunSummary(tables=tables, failures=failed, duration_s=0.0)
    if summary.copied:
        _wait_for_a_target_slot(instance, log)
        _run_setup_assets(
            defs, [INDEXES_KEY, SEQUENCES_KEY, SECURITY_KEY, MATVIEWS_KEY], instance, command
        )
        if settings.verify:
            log("Verifying every table against the source")
            try:
                _wait_for_a_target_slot(instance, log)
                summary.verified = _run_report(defs, instance, command, settings)
            except KeyboardInterrupt:
                raise VerificationInterrupted from None
            summary.report_dir = report_dir().resolve()
    summary.duration_s = time.monotonic() - started
    return summary


T = TypeVar("T")


def _between_steps(read: Callable[[], T]) -> T:
    """A read of this process's between two steps, retried as the steps retry theirs: a
    pooler restarting as the copy ends (its connection refused for a second or two) is no
    reason to leave the sequences, security and verification undone."""
    return retrying(read, what=f"reading the {target_url().describe()}")


def _checkpoints_now(names: set[str]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The failed ranges' sentences, and partitions by state per table, of `names` (not a
    table the manifest no longer lists, dropped since)."""
    with borrowed(target_url()) as target:
        failed = [
            f"{cp.table_name} partition {cp.partition_key}: {cp.error_message}"
            for cps in checkpoints.load_by_table(target, names).values()
            for cp in cps
            if cp.status == checkpoints.Status.FAILED
        ]
        tables = {k: v for k, v in checkpoints.summary(target).items() if k in names}
    return failed, tables


def _check_the_source(moved: bool, log: Callable[[str], None]) -> None:
    """The source the target was migrated from, or (`--new-source`) a new one recorded."""
    with borrowed(source_url()) as source, borrowed(target_url()) as target:
        if not moved:
            checkpoints.refuse_another_source(source, target)
        elif checkpoints.bookkeeping_exists(target, "migration_source"):
            recorded = checkpoints.recorded_source(target)
            shown = checkpoints.record_source(source, target, replace=True).describe()
            if recorded is not None:
                log(f"Migrating from {shown} from now on, instead of {recorded.describe()}.")


def _refuse_tables_dropped_since_copied(manifest_path: Path) -> None:
    existing = manifest_io.read_if_present(manifest_path)
    if existing is None:
        return
    with borrowed(target_url()) as target:
        dropped = checkpoints.dropped_since_copied(target, [t.name for t in existing.tables])
    if dropped:
        raise ConfigError(checkpoints.dropped_sentence(dropped))


def _refuse_nothing_to_resume(manifest_path: Path) -> None:
    """`resume` goes on with a run; on a target no run has planned it would be a first run,
    perhaps into the wrong project."""
    with borrowed(target_url()) as target:
        planned = checkpoints.planned_anything(target)
    if not planned:
        raise ConfigError(
            unrecorded_note(manifest_path)
            or "Nothing to resume: no run has planned this target yet; start with "
            "`supabase-migrate run`, or check that SUPABASE_DB_URL names the right database."
        )


def _units_to_run(
    manifest: Manifest,
    instance: dg.DagsterInstance,
    resume: bool,
    repair: Mapping[str, set[str]] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[Unit]:
    """Contiguous spans of ranges to copy: not completed, or (catch-up) changed at the source;
    and those `repair` names, re-synced whatever their source checksum says."""
    units: list[Unit] = []
    with (
        borrowed(source_url()) as source,
        borrowed(target_url()) as target,
    ):
        names = [t.name for t in manifest.tables]
        tables = live_tables(source, names)
        options = CopyOptions(collate_c=needs_bytewise_keys(source, target))
        planned = checkpoints.load_by_table(target, names)
    if resume:
        todo = {
            name: {cp.partition_key for cp in cps if cp.status != Status.COMPLETED}
            for name, cps in planned.items()
        }
    else:  # catch-up: unchanged completed ranges need no Dagster run at all
        # Each table's check reads it whole: two tables at a time, biggest first.
        order = sorted(names, key=lambda name: -tables[name].size_bytes)
        todo = dict(
            side_by_side(
                lambda: borrowed(source_url()),
                order,
                lambda conn, name: (
                    name,
                    changed_or_unfinished(conn, tables[name], planned[name], options),
                ),
                what=lambda name: f"Checking {name} on the source for changes",
            )
        )
    for name in names:
        keys = instance.get_dynamic_partitions(partitions_def_name(name))
        forced = (repair or {}).get(name, set())
        gone = sorted(forced - set(keys))
        if gone:
            log(f"{name}: {len(gone)} range(s) to repair are no longer planned ({gone[0]}, ...).")
        units += make_units(name, keys, todo[name] - forced)
        units += make_units(name, keys, forced, resync=True)
    return biggest_first(units, {name: info.size_bytes for name, info in tables.items()})


def _marked_to_copy_again(manifest: Manifest) -> dict[str, set[str]]:
    """Per table, the ranges completed before and marked to be copied again since
    (`checkpoints.copy_again_statements`): pending, with a completion time."""
    with borrowed(target_url()) as target:
        return checkpoints.marked_to_copy_again_by_table(target, (t.name for t in manifest.tables))


def _units_to_copy_again(
    manifest: Manifest, instance: dg.DagsterInstance, before: Mapping[str, set[str]]
) -> list[Unit]:
    """The ranges a range of this run marked to be copied again and no unit of it copied
    since (not those marked `before` it: another run's, which it may be copying still)."""
    units: list[Unit] = []
    for name, marked in _marked_to_copy_again(manifest).items():
        fresh = marked - before.get(name, set())
        if fresh:
            units += make_units(
                name, instance.get_dynamic_partitions(partitions_def_name(name)), fresh
            )
    return units


def _collisions_across_units(instance: dg.DagsterInstance, units: Sequence[Unit]) -> list[Unit]:
    """The failed ranges of tables copied in several units whose failure was a unique value
    another row held: a table run tries its own collided ranges again after its other ranges,
    but the row holding the value may have been in another unit's range, copied beside it or
    after it (a value moved between rows far apart, a row deleted where another takes its
    value)."""
    spread = sorted(name for name, count in Counter(u.table for u in units).items() if count > 1)
    if not spread:
        return []
    with borrowed(target_url()) as target:
        planned = checkpoints.load_by_table(target, spread)
    found: list[Unit] = []
    for name in spread:
        keys = {
            cp.partition_key
            for cp in planned.get(name, [])
            if cp.status == Status.FAILED and collided(cp.error_message)
        }
        if keys:
            found += make_units(
                name, instance.get_dynamic_partitions(partitions_def_name(name)), keys
            )
    return found


def biggest_first(units: Sequence[Unit], size_bytes: dict[str, int]) -> list[Unit]:
    """Units of the biggest tables first, so that the longest tail starts early (workers take
    them in this order); size on disk predicts a table's copy time better than its row count
    (wide rows, uuid keys). A table's own units keep their partition order."""
    return sorted(units, key=lambda u: -size_bytes[u.table])


def _execute_with_progress(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    manifest: Manifest,
    units: Sequence[Unit],
    pool: ProcessPoolExecutor | None,
    progress: Callable[[dict[str, dict[str, int]]], None] | None,
) -> list[tuple[str, str]]:
    stop = threading.Event()
    watcher = None
    if progress is not None:
        watcher = threading.Thread(target=_watch, args=(progress, stop), daemon=True)
        watcher.start()
    try:
        return _execute_all(defs, instance, manifest, units, pool)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()


def _run_report(
    defs: dg.Definitions, instance: dg.DagsterInstance, command: str, settings: Settings
) -> bool:
    """Materialize the verification report; True when it passed."""
    config = {"sample_size": settings.sample_size, "seed": settings.seed}
    result = _materialize(
        defs,
        [REPORT_KEY],
        instance,
        command,
        run_config={"ops": {REPORT_KEY.to_python_identifier(): {"config": config}}},
    )
    if not result.success:
        raise _run_failure(result)
    evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == REPORT_CHECK]
    return bool(evaluations) and all(e.passed for e in evaluations)


def _execute_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    manifest: Manifest,
    units: Sequence[Unit],
    pool: ProcessPoolExecutor | None,
) -> list[tuple[str, str]]:
    """Run every unit, in the given order (in this process without a pool); returns (table,
    sentence) for each unit that failed.

    With worker processes, this one's kept connections are closed first: idle through the
    copy, they would take places a session pooler (15 clients per user and database on
    Supabase) or a small instance's max_connections owes the workers."""
    outcomes: list[tuple[str, str | None]] = []
    if pool is None:
        for unit in units:
            outcomes.append((unit.table, execute_unit(defs, instance, unit)))
    else:
        close_kept()
        assert manifest.path is not None
        try:
            futures = {pool.submit(_worker_execute, str(manifest.path), u): u for u in units}
            for future in as_completed(futures):
                outcomes.append((futures[future].table, future.result()))
        except BrokenProcessPool:
            raise MigrationError(
                "A copy worker process ended before its work was done (the system stopped "
                "it, out of memory perhaps); completed ranges are kept, and `supabase-migrate "
                "resume` does the rest."
            ) from None
    return [(table, message) for table, message in outcomes if message is not None]


def _watch(progress: Callable[[dict[str, dict[str, int]]], None], stop: threading.Event) -> None:
    try:
        with borrowed(target_url()) as target:
            while not stop.wait(1.0):
                progress(checkpoints.summary(target))
    except (MigrationError, psycopg.Error):
        return  # the display is a nicety; the run itself reports real failures
