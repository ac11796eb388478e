"""The example clinic application: a real Alembic project plus a data generator.

It plays the user's application in the demo and the tests, so Alembic schema mode is exercised
on an ordinary Alembic setup (alembic.ini, env.py, a history of revisions) rather than on a
fixture tailored to the migrator. The schema holds what a migrator must get right: enums, a
generated column, identity and serial-owned sequences, jsonb, arrays, ranges, bytea, a
composite primary key and a table without any primary key.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, Connection

__all__ = ["ALEMBIC_INI", "HEAD", "TABLES", "alembic_config", "upgrade_head"]

ALEMBIC_INI: Path = Path(__file__).resolve().parent / "alembic.ini"
MIGRATIONS_DIR: Path = ALEMBIC_INI.parent / "migrations"

#: The newest revision; `upgrade head` on a fresh database ends here.
HEAD = "0003"

#: The application's tables, parents before children (foreign-key order).
TABLES: tuple[str, ...] = (
    "public.providers",
    "public.patients",
    "public.appointments",
    "public.prescriptions",
    "public.lab_results",
    "public.vital_readings",
)


def _sqlalchemy_url(url: str | URL) -> str:
    """A URL string for SQLAlchemy; bare postgresql:// URLs get the psycopg 3 driver."""
    text = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            return "postgresql+psycopg://" + text[len(prefix) :]
    return text


def alembic_config(url_or_connection: str | URL | Connection | None = None) -> Config:
    """The app's Alembic Config, usable from any working directory.

    A SQLAlchemy Connection is shared with env.py through ``attributes["connection"]`` (the
    caller then owns its transaction); a URL becomes ``sqlalchemy.url``; None leaves env.py to
    read DATABASE_URL. Logging is left to the host process.
    """
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["configure_logger"] = False
    if isinstance(url_or_connection, Connection):
        config.attributes["connection"] = url_or_connection
    elif url_or_connection is not None:
        # ConfigParser interpolates '%', which percent-encoded passwords contain.
        config.set_main_option(
            "sqlalchemy.url", _sqlalchemy_url(url_or_connection).replace("%", "%%")
        )
    return config


def upgrade_head(sqlalchemy_url_or_connection: str | URL | Connection) -> None:
    """`alembic upgrade head` for the example app on the given database.

    With a Connection already inside a transaction, the caller commits; otherwise Alembic
    commits the upgrade itself.
    """
    command.upgrade(alembic_config(sqlalchemy_url_or_connection), "head")
