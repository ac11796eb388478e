"""Garbage collection around Dagster's long-lived objects.

Importing Dagster, opening its instance and building the definitions make hundreds of
thousands of objects that live as long as the process. CPython's full collections walk every
tracked object, and come each time the heap has grown by a quarter: while those objects pile
up, the collector walks them again and again (0.6-0.7 s of CPU in `verify`, measured), and a
forked worker, walking what it inherited, also copies the pages they sit on. Frozen objects
(`gc.freeze`) are skipped by every collection, including the interpreter's last ones.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def loading_long_lived() -> Iterator[None]:
    """No collection while the block loads what will live as long as the process, then every
    object alive frozen. Process-wide: collection pauses for every thread meanwhile, and the
    other threads' objects are frozen too (both are what we want while a command starts). The
    command that loaded calls `release` when it ends, so that a caller in the same process (a
    test) goes on as before; the CLI freezes everything again at exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@contextmanager
def frozen_while_forking() -> Iterator[None]:
    """Forked children start with everything the parent holds frozen. The parent then
    unfreezes, unless something was frozen before (it stays so)."""
    already_frozen = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not already_frozen:
            gc.unfreeze()


def release() -> None:
    """Back to normal collection: whatever was frozen is collectable again."""
    gc.unfreeze()


def freeze_for_exit() -> None:
    """Nothing runs after this but the interpreter's teardown, whose collections then skip
    everything (what is left in reference cycles is not finalized: the process ends)."""
    gc.freeze()
