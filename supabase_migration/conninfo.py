"""Parsing, classifying and rendering database connection strings (pure: no network I/O).

Everything the tool knows about a database comes through `parse_database_url`, which turns a
URL or a libpq key=value string into a `DatabaseUrl`: it works out which Supabase endpoint the
URL points at (direct host, session pooler, transaction pooler or a self-hosted server), applies
the SSL policy (a HIPAA target is never reached in clear text by accident) and refuses malformed
input with one sentence that never repeats the password.

A `DatabaseUrl` never shows its password in `repr()`/`str()` and refuses to be pickled, so it
cannot leak into logs, Dagster metadata or an IO manager; it hands the password only to libpq
(`conninfo()`, `libpq_env()`) and SQLAlchemy (`sqlalchemy_url()`).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError

if TYPE_CHECKING:
    import sqlalchemy.engine

DEFAULT_APPLICATION_NAME = "supabase-migration"
DEFAULT_PORT = 5432
DEFAULT_DBNAME = "postgres"
SUPABASE_POOLER_TRANSACTION_PORT = 6543

URL_SCHEMES = frozenset(
    {
        "postgres",
        "postgresql",
        "postgresql+psycopg",
        "postgresql+psycopg2",
        "postgresql+psycopg_async",
        "postgresql+asyncpg",
    }
)
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
INSECURE_SSLMODES = frozenset({"disable", "allow", "prefer"})
VERIFYING_SSLMODES = frozenset({"verify-ca", "verify-full"})
INSECURE_FLAG = "--allow-insecure-ssl"
INSECURE_ENV = "SUPABASE_MIGRATION_ALLOW_INSECURE_SSL"  # the flag's setting, outside the CLI

# Connection parameters that hold secrets: never rendered by `redacted()`.
SECRET_PARAMS = frozenset({"password", "sslpassword"})
# Parameters that become fields of `DatabaseUrl` rather than staying in `params`.
_FIELD_PARAMS = frozenset({"host", "port", "user", "password", "dbname"})

# libpq parameter -> environment variable, for subprocesses (pg_dump, psql, pg_restore).
_ENV_BY_PARAM = {
    "hostaddr": "PGHOSTADDR",
    "passfile": "PGPASSFILE",
    "channel_binding": "PGCHANNELBINDING",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "require_auth": "PGREQUIREAUTH",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "gssdelegation": "PGGSSDELEGATION",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}

_SUPABASE_DB_HOST = re.compile(r"db\.([a-z0-9]+)\.supabase\.co")
_SUPABASE_API_HOST = re.compile(r"([a-z0-9]+)\.supabase\.co")
_SUPABASE_POOLER_HOST = re.compile(r"[a-z0-9.-]+\.pooler\.supabase\.com")
_POOLER_USER = re.compile(r"[^.]+\.([a-z0-9]+)")
_OPTION_NAME = re.compile(r'invalid connection option "([A-Za-z0-9_]+)"')


class Endpoint(StrEnum):
    """Which kind of server a URL reaches; it decides session-state and prepared-statement use."""

    DIRECT = "direct"
    SESSION_POOLER = "session_pooler"
    TRANSACTION_POOLER = "transaction_pooler"
    SELF_HOSTED = "self_hosted"

    @property
    def display_name(self) -> str:
        """How messages name the endpoint: 'direct', 'session pooler', ..."""
        return _ENDPOINT_NAMES[self]

    @classmethod
    def named(cls, text: str) -> Endpoint:
        """An endpoint as a user wrote it (SUPABASE_DB_ENDPOINT, a resource's config). The value
        is not echoed: someone may have pasted a URL there."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ConfigError(
                "An endpoint setting (SUPABASE_DB_ENDPOINT, or a resource's `endpoint`) must be "
                f"one of {', '.join(e.value for e in cls)}."
            ) from None


_ENDPOINT_NAMES = {
    Endpoint.DIRECT: "direct",
    Endpoint.SESSION_POOLER: "session pooler",
    Endpoint.TRANSACTION_POOLER: "transaction pooler",
    Endpoint.SELF_HOSTED: "self-hosted",
}


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 and unix-socket directories (nothing leaves the box)."""
    if not host:
        return False
    if host.startswith(("/", "@")):  # unix socket directory / Linux abstract namespace
        return True
    if host.lower() in {"localhost", "localhost.localdomain", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DatabaseUrl:
    """One parsed, validated connection target. Build it with `parse_database_url`."""

    label: str
    host: str
    port: int
    user: str
    dbname: str
    password: str | None = field(repr=False)
    params: Mapping[str, str] = field(default_factory=dict, hash=False)
    endpoint: Endpoint = Endpoint.SELF_HOSTED

    def __post_init__(self) -> None:
        # Freeze the params too, so a DatabaseUrl can be shared between threads safely.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    # -- classification ------------------------------------------------------------------

    @property
    def is_loopback(self) -> bool:
        hostaddr = self.params.get("hostaddr")
        return is_loopback_host(self.host) and (not hostaddr or is_loopback_host(hostaddr))

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith(("/", "@"))

    @property
    def uses_transaction_pooler(self) -> bool:
        return self.endpoint is Endpoint.TRANSACTION_POOLER

    @property
    def is_supabase(self) -> bool:
        host = self.host.lower()
        return bool(_SUPABASE_DB_HOST.fullmatch(host) or _SUPABASE_POOLER_HOST.fullmatch(host))

    @property
    def project_ref(self) -> str | None:
        """The Supabase project ref, from the db.<ref> host or the postgres.<ref> pooler user."""
        match = _SUPABASE_DB_HOST.fullmatch(self.host.lower())
        if match:
            return match.group(1)
        if _SUPABASE_POOLER_HOST.fullmatch(self.host.lower()):
            user_match = _POOLER_USER.fullmatch(self.user)
            if user_match:
                return user_match.group(1)
        return None

    @property
    def sslmode(self) -> str | None:
        return self.params.get("sslmode")

    @property
    def application_name(self) -> str:
        return self.params.get("application_name") or DEFAULT_APPLICATION_NAME

    # -- rendering -----------------------------------------------------------------------

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def redacted(self) -> str:
        """A URL safe for logs and metadata: the password (and sslpassword) shown as ***."""
        userinfo = quote(self.user, safe="")
        if self.password is not None:
            userinfo += ":***"
        if self.is_unix_socket:
            host = quote(self.host, safe="")
        elif ":" in self.host:
            host = f"[{self.host}]"
        else:
            host = self.host
        query = "&".join(
            f"{quote(key, safe='')}={'***' if key in SECRET_PARAMS else quote(value, safe='/')}"
            for key, value in self.params.items()
        )
        url = f"postgresql://{userinfo}@{host}:{self.port}/{quote(self.dbname, safe='')}"
        return f"{url}?{query}" if query else url

    def describe(self) -> str:
        """Short human label for messages, e.g. 'target db.abc.supabase.co:5432 (direct)'."""
        return f"{self.label} {self.host_port} ({self.endpoint.display_name})"

    @property
    def identity(self) -> str:
        """Which database, as user@host:port/dbname: a pooler's host serves every project of
        its region, its user (postgres.<ref>) tells them apart. Never the password."""
        return f"{self.user}@{self.host_port}/{self.dbname}"

    def conninfo(self, *, with_password: bool = True, **overrides: Any) -> str:
        """A libpq key=value string; an override of None removes that key."""
        values: dict[str, Any] = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.dbname,
            "password": self.password if with_password else None,
            "application_name": self.application_name,
            **self.params,
        }
        if not with_password:
            values.pop("sslpassword", None)
        values.update(overrides)
        return make_conninfo("", **{k: v for k, v in values.items() if v is not None})

    def sqlalchemy_url(self) -> sqlalchemy.engine.URL:
        """A SQLAlchemy URL for the psycopg (3) driver, with the libpq params as query."""
        import sqlalchemy.engine  # only engines need it (see connections.make_engine)

        query = {"application_name": self.application_name, **self.params}
        return sqlalchemy.engine.URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            database=self.dbname,
            query=query,
        )

    def async_sqlalchemy_url(self) -> sqlalchemy.engine.URL:
        """The same URL for `create_async_engine`: SQLAlchemy 2 picks psycopg's async side."""
        return self.sqlalchemy_url()

    def libpq_env(self) -> dict[str, str]:
        """PG* environment variables for pg_dump/psql, so no password is on a command line.

        Merge it over a copy of `os.environ`; params without an environment variable
        (for example keepalives or sslpassword) are not carried.
        """
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": self.dbname,
            "PGAPPNAME": self.application_name,
        }
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        for key, value in self.params.items():
            name = _ENV_BY_PARAM.get(key)
            if name:
                env[name] = value
        return env

    # -- never leak ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"DatabaseUrl({self.redacted()!r}, label={self.label!r}, "
            f"endpoint={self.endpoint.value!r})"
        )

    def __str__(self) -> str:
        return self.redacted()

    def __reduce__(self) -> Any:
        raise TypeError(
            "DatabaseUrl holds a password and cannot be pickled; pass redacted() or re-parse "
            "the URL from its environment variable in the other process."
        )

    def __copy__(self) -> DatabaseUrl:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> DatabaseUrl:
        return self


# -- parsing -----------------------------------------------------------------------------------


class _Malformed(Exception):
    """Internal: a reason (never containing the input) why a string is not a valid URL."""


def parse_database_url(
    text: str,
    *,
    label: str,
    endpoint: Endpoint | None = None,
    allow_insecure: bool = False,
    sslrootcert: str | None = None,
) -> DatabaseUrl:
    """Parse a URL or libpq key=value string, classify it and apply the SSL policy.

    `endpoint` overrides detection (for a self-hosted pooler such as PgBouncer in front of a
    local server); `sslrootcert` overrides the URL's CA file; `allow_insecure` permits
    sslmode disable/allow/prefer on a non-loopback host.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"The {label} URL is empty: give a postgresql:// URL.")
    text = text.strip()
    try:
        looks_like_url = re.match(r"[^\s=]*://", text) is not None
        parts = _parse_url(text) if looks_like_url else _parse_keyvalue(text)
        # Prisma-style URLs from Supabase's ORM tab mark the transaction pooler this way.
        if parts.pop("pgbouncer", "").lower() in {"true", "1"} and endpoint is None:
            endpoint = Endpoint.TRANSACTION_POOLER
        params = _check_params(parts)
    except _Malformed as exc:
        raise ConfigError(
            f"The {label} URL is not a valid PostgreSQL connection string: {exc}."
        ) from None

    host = params.pop("host", "") or params.get("hostaddr", "")
    port_text = params.pop("port", "")
    user = params.pop("user", "")
    password = params.pop("password", None)
    dbname = params.pop("dbname", "") or DEFAULT_DBNAME

    if not host:
        raise ConfigError(
            f"The {label} URL has no host: write postgresql://user:password@host:5432/dbname "
            "(or add host=/socket/directory for a local unix socket)."
        )
    if "," in host or "," in port_text:
        raise ConfigError(
            f"The {label} URL lists several hosts; give exactly one host to migrate from or to."
        )
    port = _parse_port(port_text, label)
    loopback = is_loopback_host(host) and is_loopback_host(params.get("hostaddr") or host)
    if not user:
        if not loopback:
            raise ConfigError(
                f"The {label} URL has no user name: write it before the host, as in "
                "postgresql://user:password@host:5432/dbname."
            )
        user = "postgres"

    if sslrootcert:
        params["sslrootcert"] = sslrootcert
    if params.get("sslrootcert", "system") != "system":
        # libpq does not expand ~ and resolves relative paths against the current directory,
        # which differs for pg_dump subprocesses: pin the file down now.
        params["sslrootcert"] = os.path.abspath(os.path.expanduser(params["sslrootcert"]))
    _apply_ssl_policy(params, label=label, host=host, loopback=loopback, allow=allow_insecure)

    detected = _classify(host, port, user, label)
    return DatabaseUrl(
        label=label,
        host=host,
        port=port,
        user=user,
        dbname=dbname,
        password=password,
        params=params,
        endpoint=endpoint if endpoint is not None else detected,
    )


def _parse_url(text: str) -> dict[str, str]:
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in URL_SCHEMES:
        raise _Malformed(
            "it must start with postgresql:// (or postgres://, postgresql+psycopg://)"
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme)
            else "the scheme before :// is not postgresql"
        )
    if "#" in rest:
        raise _Malformed("it contains a '#'; percent-encode it as %23 if it is in the password")
    if any(ch.isspace() for ch in rest):
        raise _Malformed("it contains white space; percent-encode it as %20")
    # The authority ends at the first / or ? after the last @ before the query: this keeps a
    # raw @ or / in a password working, as long as the query itself has no @ in its way.
    start = rest.partition("?")[0].rfind("@") + 1
    ends = [pos for pos in (rest.find("/", start), rest.find("?", start)) if pos != -1]
    authority_end = min(ends, default=len(rest))
    authority, remainder = rest[:authority_end], rest[authority_end:]
    path, _, query = remainder.partition("?")
    if (
        remainder.startswith("?")  # no /dbname between: the '?' may be inside the user info
        and "@" in query
        and "@" not in authority
        and _may_hold_a_password(authority)
    ):
        # The user info holds a raw '?' (in the password, surely): what follows it is not a
        # query, and naming its "settings" would echo part of the password.
        raise _Malformed(
            "percent-encode a '?' in the password as %3F (and an '@' in a query value as %40)"
        )

    values: dict[str, str] = {}
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        values["user"] = unquote(user)
        if colon:
            values["password"] = unquote(password)
    host, port = _split_hostport(hostport)
    if host:
        values["host"] = unquote(host)
    if port:
        values["port"] = port
    if path.startswith("/") and len(path) > 1:
        values["dbname"] = unquote(path[1:])
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq:
            raise _Malformed("a query parameter has no '=' (write key=value)")
        values[unquote(key)] = unquote(value)  # like libpq, the query wins over the user info
    return values


def _may_hold_a_password(authority: str) -> bool:
    """`user:secret` (even `user:2024`) rather than `host` or `[::1]:5432`. A `host:5432`
    followed by a query with an '@' is taken for one too: refusing it costs a %40."""
    return ":" in authority and not authority.startswith("[")


def _split_hostport(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end == -1:
            raise _Malformed("an IPv6 host opened with [ is not closed with ]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _Malformed("unexpected text after the bracketed IPv6 host")
        return host, rest[1:]
    if hostport.count(":") > 1 and "," not in hostport:
        raise _Malformed("an IPv6 host must be written in brackets, as in [::1]:5432")
    host, _, port = hostport.partition(":")
    return host, port


def _parse_keyvalue(text: str) -> dict[str, str]:
    if "=" not in text:
        raise _Malformed("it is neither a postgresql:// URL nor a list of key=value settings")
    try:
        values = conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        # libpq's message can quote part of the input (even the password): name only an
        # unknown option, which is a bare identifier.
        match = _OPTION_NAME.search(str(exc))
        if match:
            raise _Malformed(_unknown_setting(match.group(1))) from None
        raise _Malformed(
            "the key=value settings could not be read (quote values containing spaces "
            "or quotes with single quotes)"
        ) from None
    return {key: str(value) for key, value in values.items() if value is not None}


def _unknown_setting(name: str) -> str:
    """Named only when it is a typo of a libpq option: another unknown word may be a piece of
    a password whose `/`, `?`, `&` or spaces were left unencoded (unquoted), which libpq then
    read as a setting's name."""
    known = [option.keyword.decode() for option in pq.Conninfo.get_defaults()]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    if close:
        return f"unknown setting {name} (did you mean {close[0]}?)"
    return (
        "it has a setting libpq does not know (not named: it may be a piece of the password; "
        "in a URL a password holding /, ?, &, # or spaces must be percent-encoded, in "
        "key=value form quoted)"
    )


def _check_params(values: dict[str, str]) -> dict[str, str]:
    """Ask libpq whether every key is a connection option it knows (keys only, never values)."""
    unknown_probe = {key: "x" for key in values if key not in _FIELD_PARAMS}
    for key in unknown_probe:
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise _Malformed("a query parameter name is not a libpq setting")
    try:
        conninfo_to_dict(make_conninfo("", **unknown_probe))
    except psycopg.ProgrammingError as exc:
        match = _OPTION_NAME.search(str(exc))
        raise _Malformed(_unknown_setting(match.group(1) if match else "")) from None
    sslmode = values.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise _Malformed(f"sslmode must be one of {', '.join(SSLMODES)}")
    return dict(values)


def _parse_port(port_text: str, label: str) -> int:
    if not port_text:
        return DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"The {label} URL is not a valid PostgreSQL connection string: the port is not a "
            "number from 1 to 65535 (percent-encode @ / % # : in the password, e.g. %40 for @)."
        )
    return int(port_text)


def _apply_ssl_policy(
    params: dict[str, str], *, label: str, host: str, loopback: bool, allow: bool
) -> None:
    sslmode = params.get("sslmode")
    rootcert = params.get("sslrootcert")
    if rootcert == "system":
        # libpq refuses sslrootcert=system with anything weaker than verify-full.
        if sslmode is None:
            params["sslmode"] = sslmode = "verify-full"
        elif sslmode != "verify-full":
            raise ConfigError(
                f"The {label} URL combines sslrootcert=system with sslmode={sslmode}; libpq "
                "accepts the system CA store only with sslmode=verify-full."
            )
    if sslmode is None and not loopback:
        params["sslmode"] = sslmode = "require"
    if sslmode in INSECURE_SSLMODES and not loopback and not allow:
        raise ConfigError(
            f"The {label} URL sets sslmode={sslmode} for {host}, which may send data "
            f"unencrypted; use sslmode=require or verify-full, or pass {INSECURE_FLAG} "
            f"({INSECURE_ENV}=1 in Dagster) if this network is trusted."
        )
    if sslmode in VERIFYING_SSLMODES and not rootcert:
        raise ConfigError(
            f"The {label} URL sets sslmode={sslmode} but names no CA certificate: pass "
            "sslrootcert=/path/to/prod-ca-2021.crt (download it from the Supabase dashboard's "
            "Database Settings) or sslrootcert=system."
        )
    if rootcert and rootcert != "system" and not os.path.isfile(rootcert):
        raise ConfigError(
            f"The {label} CA certificate file {rootcert} does not exist; download "
            "prod-ca-2021.crt from the Supabase dashboard's Database Settings and give its path."
        )


def _classify(host: str, port: int, user: str, label: str) -> Endpoint:
    lowered = host.lower()
    if _SUPABASE_DB_HOST.fullmatch(lowered):
        # The direct host serves Postgres on 5432 and the dedicated PgBouncer on 6543.
        if port == SUPABASE_POOLER_TRANSACTION_PORT:
            return Endpoint.TRANSACTION_POOLER
        return Endpoint.DIRECT
    if _SUPABASE_POOLER_HOST.fullmatch(lowered):
        if not _POOLER_USER.fullmatch(user):
            raise ConfigError(
                f"The {label} URL points at the Supabase pooler, whose user name is "
                f"postgres.<project-ref> (for example postgres.abcdefghijklmnopqrst), not {user}."
            )
        if port == SUPABASE_POOLER_TRANSACTION_PORT:
            return Endpoint.TRANSACTION_POOLER
        return Endpoint.SESSION_POOLER
    api = _SUPABASE_API_HOST.fullmatch(lowered)
    if api and api.group(1) != "db":
        raise ConfigError(
            f"The {label} host {host} is the Supabase project's API address, not its database: "
            f"use db.{api.group(1)}.supabase.co or the pooler host from the dashboard's "
            "Connect panel."
        )
    return Endpoint.SELF_HOSTED
