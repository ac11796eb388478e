"""One error hierarchy for the whole tool.

Every message is a single sentence meant for a person: it names the endpoint or object and what
to do, and never carries a password or a row value. Boundaries (CLI, Dagster asset bodies) catch
`MigrationError` once and map it to an exit code or a failed step; nothing below them prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MigrationError(Exception):
    """Base class: a failure the user can act on, described in one PHI-free sentence."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(MigrationError):
    """Bad input: malformed URL, unknown option, missing manifest, insecure settings."""

    exit_code = 2


class ConnectionFailed(ConfigError):
    """A database could not be reached or refused us (host, port, password, SSL, database)."""


class TransientError(MigrationError):
    """A failure worth retrying: restart, admin shutdown, serialization failure, pooler hiccup."""


class PreflightError(MigrationError):
    """The source uses something the target cannot take; raised before any data moves."""

    exit_code = 2


class SchemaError(MigrationError):
    """Applying the schema to the target failed."""


class CopyError(MigrationError):
    """Copying one key range failed; the range's transaction was rolled back."""


class UniqueCollision(CopyError):
    """A range's rows want a unique value a row of another range still holds on the target:
    copying that range first may free it (a value shifted up, across every range)."""


class ConcurrentRunError(MigrationError):
    """Another run holds the same partition; this one stepped aside without writing."""


class InterruptedBeforeCopying(KeyboardInterrupt):
    """Ctrl-C before `run` planned its ranges: nothing of this run's was copied, and on a
    target no run has planned, `resume` refuses; `run` is what goes on."""


class VerificationInterrupted(KeyboardInterrupt):
    """Ctrl-C while `run` verified: every range was copied, so `verify`, not `resume`, is
    what finishes the job."""


def listed(items: Sequence[str], limit: int = 10, total: int | None = None) -> str:
    """The first `limit` items, and how many more (of `total`, when the items are a sample of
    them): a list inside a sentence."""
    head = ", ".join(items[:limit])
    more = (len(items) if total is None else total) - min(limit, len(items))
    return head + (f" and {more} more" if more > 0 else "")


def read_user_text(path: Path, what: str, missing: str) -> str:
    """The UTF-8 text of a file the user gave us, or a ConfigError naming the file and never
    its content: `missing` when it does not exist, else "`what` `path` cannot be read (why)."."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} cannot be read (not UTF-8 text).") from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(f"{what} {path} cannot be read ({reason}).") from None
