"""Dagster resources for the two databases.

URLs come from environment variables through `EnvVar`, so they are resolved at run time, masked
in the UI and never stored in run config. A resource's repr and str show `DatabaseUrl.describe()`
(which database, host and port, what kind of endpoint), never the URL it was given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import dagster as dg
import psycopg
from pydantic import Field

from .connections import keep, retrying, reused
from .conninfo import DatabaseUrl, Endpoint, parse_database_url
from .errors import MigrationError
from .inputs import (
    SOURCE_URL_ENV,
    SSLROOTCERT_ENV,
    TARGET_ENDPOINT_ENV,
    TARGET_URL_ENV,
    insecure_ssl_allowed,
)


class _Database(dg.ConfigurableResource):
    url: str = Field(description="Connection URL; supply it with EnvVar, never inline.")
    endpoint: str | None = Field(
        default=None,
        description="Override endpoint detection: direct, session_pooler, transaction_pooler.",
    )
    sslrootcert: str | None = Field(default=None, description="CA file for verify-ca/verify-full.")
    allow_insecure_ssl: bool = Field(
        default=False, description="Permit sslmode disable/allow/prefer on a non-loopback host."
    )
    connect_timeout: int = Field(default=10, description="Seconds to wait for a connection.")

    label: ClassVar[str] = "database"

    def __repr__(self) -> str:
        """Pydantic's repr would print the resolved URL, password included."""
        try:
            where = self.database_url().describe()
        except MigrationError:
            where = "a URL that does not parse"
        return f"{type(self).__name__}({where})"

    __str__ = __repr__

    def database_url(self) -> DatabaseUrl:
        return parse_database_url(
            self.url,
            label=self.label,
            endpoint=Endpoint.named(self.endpoint) if self.endpoint else None,
            allow_insecure=self.allow_insecure_ssl,
            sslrootcert=self.sslrootcert,
        )

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection, retried on transient failures; kept open afterwards for
        the run's next asset when it is idle (`connections.keep`), else closed."""
        url = self.database_url()
        conn = retrying(
            lambda: reused(url, connect_timeout=self.connect_timeout),
            what=f"connecting to the {url.describe()}",
        )
        try:
            yield conn
        finally:
            keep(url, conn)


class SourceDatabase(_Database):
    """The PostgreSQL database being migrated (read only)."""

    label: ClassVar[str] = "source"


class TargetDatabase(_Database):
    """The Supabase database receiving the migration (direct or session pooler preferred)."""

    label: ClassVar[str] = "target"


def _optional_env(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources wired to the documented environment variables."""
    insecure = insecure_ssl_allowed()
    return {
        "source": SourceDatabase(url=dg.EnvVar(SOURCE_URL_ENV), allow_insecure_ssl=insecure),
        "target": TargetDatabase(
            url=dg.EnvVar(TARGET_URL_ENV),
            endpoint=_optional_env(TARGET_ENDPOINT_ENV),  # type: ignore[arg-type]
            sslrootcert=_optional_env(SSLROOTCERT_ENV),  # type: ignore[arg-type]
            allow_insecure_ssl=insecure,
        ),
    }
