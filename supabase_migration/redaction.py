"""Keeping passwords and row values (PHI) out of every message the tool prints or records.

Two tools: `redact_text` masks secrets in free text (URLs, key=value strings, known passwords),
and `describe_pg_error` turns a database error into a sentence built only from what cannot
carry a row value: the SQLSTATE, its condition name and the object names the server reports.
PostgreSQL's DETAIL ("Key (ssn)=(123-45-6789) already exists"), WHERE/CONTEXT (which can quote
the failing COPY line) and the text after ':' in messages such as `invalid input syntax for
type integer: "abc"` are never used.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from typing import TextIO
from urllib.parse import quote, quote_plus

import psycopg
import psycopg.errors

from .errors import MigrationError

MASK = "***"

# scheme://user:password@  -> scheme://user:***@  (greedy up to the last @ of the token, so a
# raw @ in the password is still covered; over-masking a host is acceptable, leaking is not).
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):(?P<pw>\S*)@")
# password=secret, password='se cret', sslpassword=..., PGPASSWORD=..., "password": "x".
_KEYVALUE_PASSWORD = re.compile(
    r"""(?P<key>\b\w*(?:password|passwd)\b["']?\s*[=:]\s*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s,;&)}\]]+)""",
    re.IGNORECASE,
)
_QUOTED = re.compile(r""""(?:[^"]|"")*"|(?<!\w)'(?:[^'\\]|\\.|'')*'""")
_OPEN_QUOTE = re.compile(r""""|(?<!\w)'""")
_HEX_BYTES = re.compile(r"\b0x[0-9A-Fa-f]+\b")
# The server's sentences about a built-in setting name it right after the word parameter
# (`permission denied to set parameter "…"`, `invalid value for parameter "…": "…"`): what
# the user must look up. Only under these conditions, and no dotted (custom) name, which a
# query may build from a row (`current_setting('app.' || name)`).
_PARAMETER_NAME = re.compile(r'"[A-Za-z_][A-Za-z0-9_]*"')
_PARAMETER_CONDITIONS = frozenset({"42501", "55P02", "22023"})
# The server's encoding names, which its conversion errors quote ('... in encoding "UTF8" has
# no equivalent in encoding "LATIN1"'): kept, since they say what to fix, and hold no value.
_ENCODINGS = frozenset(
    (
        *("SQL_ASCII", "UTF8", "MULE_INTERNAL", "KOI8R", "KOI8U", "BIG5", "GBK", "GB18030"),
        *("UHC", "SJIS", "SHIFT_JIS_2004", "JOHAB", "WIN866", "WIN874", "EUC_CN", "EUC_KR"),
        *("EUC_TW", "EUC_JP", "EUC_JIS_2004"),
        *(f"LATIN{n}" for n in range(1, 11)),
        *(f"WIN{n}" for n in range(1250, 1259)),
        *(f"ISO_8859_{n}" for n in range(5, 9)),
    )
)
_LIBPQ_PREFIX = re.compile(
    r"^(?:connection failed: )?(?:connection to server (?:at|on) [^\n]*? failed: )?"
    r"(?:(?:FATAL|ERROR|PANIC):\s+)?"
)
# Client-side (no SQLSTATE) messages that are libpq's own words about the connection: they
# carry host names and socket errors, never row values, so their text after ':' is kept.
_CONNECTION_WORDS = re.compile(
    r"connection|server|socket|SSL|timeout|consuming input|could not (?:send|receive)",
    re.IGNORECASE,
)
_DIAG_FIELDS = ("schema_name", "table_name", "column_name", "constraint_name", "datatype_name")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask each known secret (raw and percent-encoded) and any credential in URLs or key=value."""
    if not text:
        return text
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        forms.update({secret, quote(secret, safe=""), quote_plus(secret), quote(secret)})
        forms.add(quote(secret, safe=" +"))  # SQLAlchemy's rendering of a URL (env.py's)
        forms.add(secret.replace("\\", "\\\\").replace("'", "\\'"))  # libpq-quoted form
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return _KEYVALUE_PASSWORD.sub(lambda m: f"{m.group('key')}{MASK}", text)


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


@cache
def condition_name(sqlstate: str) -> str | None:
    """'23505' -> 'unique_violation', from psycopg's generated SQLSTATE classes."""
    try:
        cls = psycopg.errors.lookup(sqlstate)
    except KeyError:
        return None
    return _CAMEL_BOUNDARY.sub("_", cls.__name__).lower().rstrip("_")


def describe_pg_error(exc: BaseException, *, context: str = "") -> str:
    """One PHI-free phrase for an error, without a final period so callers can embed it.

    e.g. 'unique_violation (23505) on public.patients, constraint patients_ssn_key: duplicate
    key value violates unique constraint "patients_ssn_key"'.
    """
    prefix = f"{context}: " if context else ""
    if isinstance(exc, MigrationError):
        return prefix + redact_text(exc.message).rstrip(".")
    if not isinstance(exc, psycopg.Error):
        text = _strip_literals(redact_text(_first_line(str(exc))), ())
        return prefix + (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    diag = exc.diag
    identifiers = tuple(
        value for value in (getattr(diag, name, None) for name in _DIAG_FIELDS) if value
    )
    sqlstate = exc.sqlstate or diag.sqlstate
    if sqlstate:
        name = condition_name(sqlstate)
        head = f"{name} ({sqlstate})" if name else f"SQLSTATE {sqlstate}"
    else:
        head = type(exc).__name__
    if (
        sqlstate and (sqlstate.startswith("P0") or condition_name(sqlstate) is None)
    ) or _raised_by_code(diag):
        # RAISE in a trigger or function, whatever its SQLSTATE: its words are the author's,
        # and may embed NEW.* values; so may the fields it names (RAISE ... USING TABLE =,
        # COLUMN =, CONSTRAINT =, plpy.error(table_name=...)), which are not named either.
        return prefix + f"{head}: message from a trigger or function withheld"
    where = _objects(diag)
    if where:
        head += f" on {where}"
    if _DYNAMIC_SQL.search(diag.context or ""):
        # A function's EXECUTE of text it built, perhaps from a row's values: the server
        # names what it could not find unquoted (column p.<value>, function <value>()).
        return prefix + f"{head}: message from a function's dynamic SQL withheld"
    primary = diag.message_primary or _first_line(str(exc))
    primary = _LIBPQ_PREFIX.sub("", primary.strip())
    if (
        sqlstate
        or not isinstance(exc, psycopg.OperationalError)
        or not _CONNECTION_WORDS.search(primary)
    ):
        # Server messages put the offending value after the colon: drop it.
        primary = primary.split(":", 1)[0]
    primary = _strip_literals(
        redact_text(primary), identifiers, parameters=sqlstate in _PARAMETER_CONDITIONS
    )
    primary = primary.strip().rstrip(".")
    return prefix + (f"{head}: {primary}" if primary else head)


# PL/pgSQL's CONTEXT line for an error inside EXECUTE of a string the function built.
_DYNAMIC_SQL = re.compile(r"\bat EXECUTE\b")

# Where procedural languages report what user code raised: PL/pgSQL's RAISE, plpy.error,
# Perl's die/elog, Tcl's error/elog, and plv8's.
_CODE_RAISE_FILES = ("pl_exec.c", "plpy_elog.c", "plpy_plpymodule.c", "plperl.c", "pltcl.c")


def _raised_by_code(diag: psycopg.errors.Diagnostic) -> bool:
    source_file = diag.source_file or ""
    return (
        diag.source_function == "exec_stmt_raise"
        or source_file in _CODE_RAISE_FILES
        or source_file.startswith("plv8")
    )


def _objects(diag: psycopg.errors.Diagnostic) -> str:
    parts = []
    table = ".".join(p for p in (diag.schema_name, diag.table_name) if p)
    if table:
        parts.append(table if diag.table_name else f"schema {table}")
    if diag.column_name:
        parts.append(f"column {diag.column_name}")
    if diag.constraint_name:
        parts.append(f"constraint {diag.constraint_name}")
    if diag.datatype_name:
        parts.append(f"type {diag.datatype_name}")
    return ", ".join(parts)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _strip_literals(text: str, identifiers: Iterable[str], *, parameters: bool = False) -> str:
    """Replace every quoted literal that is not a reported identifier, and raw byte values.

    The server quotes a value as it is, its own quotes not doubled (`invalid value "J"ane"
    for "Month"`, `relation "a" b" does not exist`), so where a value ends cannot be told:
    everything from the first quote that opens no identifier to the message's last quote is
    taken as that value."""
    allowed = {f'"{name}"' for name in identifiers} | {f"'{name}'" for name in identifiers}
    out: list[str] = []
    pos = 0
    for match in _QUOTED.finditer(text):
        between = text[pos : match.start()]
        unbalanced = _OPEN_QUOTE.search(between)
        if unbalanced:  # cannot happen with a well-formed match, but never risk a value
            out.append(between[: unbalanced.start()])
            return _HEX_BYTES.sub("0x…", "".join(out)).rstrip()
        out.append(between)
        literal = match.group(0)
        if (
            literal in allowed
            or (between.endswith("encoding ") and literal.strip('"') in _ENCODINGS)
            or (
                parameters
                and between.endswith("parameter ")
                and _PARAMETER_NAME.fullmatch(literal) is not None
            )
        ):
            out.append(literal)
            pos = match.end()
            continue
        out.append('"…"')
        pos = max(match.end(), text.rfind('"') + 1, text.rfind("'") + 1)
        break
    tail = text[pos:]
    unbalanced = _OPEN_QUOTE.search(tail)
    # An opening quote that never closes: the rest may be a truncated value, so drop it.
    out.append(tail[: unbalanced.start()] if unbalanced else tail)
    return _HEX_BYTES.sub("0x…", "".join(out)).rstrip()


class _Redacting(io.TextIOBase):
    """A stream that writes on with the secrets masked, line by line: a secret printed in
    pieces (`print(a, b, sep="")`, a progress line) is masked whole."""

    def __init__(self, stream: TextIO, secrets: list[str]) -> None:
        self._stream, self._secrets = stream, secrets
        self._partial = ""

    def write(self, text: str) -> int:
        lines, newline, self._partial = (self._partial + text).rpartition("\n")
        if newline:
            self._stream.write(redact_text(lines + newline, self._secrets))
        return len(text)

    def flush(self) -> None:  # an unfinished line waits for its end, or for `finish`
        self._stream.flush()

    def finish(self) -> None:
        if self._partial:
            self._stream.write(redact_text(self._partial, self._secrets))
            self._partial = ""
        self._stream.flush()


@contextlib.contextmanager
def redacted_output(secrets: list[str]) -> Iterator[None]:
    """What this process prints meanwhile (a user's Alembic env.py printing the URL it was
    given) with `secrets` masked. Process-wide: `sys.stdout` is swapped."""
    out, err = _Redacting(sys.stdout, secrets), _Redacting(sys.stderr, secrets)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.finish()
        err.finish()
