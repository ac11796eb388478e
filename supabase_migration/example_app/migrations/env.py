"""Alembic environment of the example clinic application.

A conventional env.py, as an application using Alembic would have one. In online mode the
database comes from, in this order:

1. a SQLAlchemy Connection in ``config.attributes["connection"]`` (the Alembic cookbook's
   "sharing a connection" recipe: the caller owns the connection and its transaction);
2. the ``sqlalchemy.url`` main option of the Config;
3. the ``DATABASE_URL`` environment variable.

No URL is written down anywhere in the project.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection

config = context.config

# The example app has no ORM models: its revisions are hand-written, so no autogenerate.
target_metadata = None

# Configure logging only when asked (the default, as with the `alembic` command), and never
# silence loggers that already exist: a host process (Dagster, pytest) keeps its own logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url(*, required: bool = True) -> str:
    """The URL from the Config, else DATABASE_URL; bare postgresql:// URLs use psycopg 3."""
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "")
    if not url:
        if not required:
            return ""
        raise RuntimeError(
            "No database given: pass a connection in Config.attributes['connection'], "
            "set sqlalchemy.url, or set DATABASE_URL."
        )
    # The app depends on psycopg 3, not psycopg2 (SQLAlchemy's default for postgresql://).
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) without connecting."""
    url = _database_url(required=False)
    context.configure(
        url=url or None,
        dialect_name=None if url else "postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    section = dict(config.get_section(config.config_ini_section, {}))
    section["sqlalchemy.url"] = _database_url()
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
