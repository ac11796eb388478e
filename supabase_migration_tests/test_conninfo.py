"""Connection-string parsing, endpoint classification and the SSL policy (no server needed)."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from supabase_migration.conninfo import (
    DEFAULT_APPLICATION_NAME,
    DatabaseUrl,
    Endpoint,
    is_loopback_host,
    parse_database_url,
)
from supabase_migration.errors import ConfigError

PASSWORD = "p@ss/w%rd#x:1"
ENCODED = "p%40ss%2Fw%25rd%23x%3A1"
REF = "abcdefghijklmnopqrst"


def parse(text: str, **kwargs) -> DatabaseUrl:
    return parse_database_url(text, label=kwargs.pop("label", "target"), **kwargs)


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "prod-ca-2021.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


# -- URL forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "user", "password", "dbname"),
    [
        ("postgres://u:pw@example.com/db", "example.com", 5432, "u", "pw", "db"),
        ("postgresql://u:pw@example.com:6000/db", "example.com", 6000, "u", "pw", "db"),
        ("postgresql+psycopg://u:pw@example.com/db", "example.com", 5432, "u", "pw", "db"),
        ("postgresql+psycopg2://u:pw@example.com/db", "example.com", 5432, "u", "pw", "db"),
        ("postgresql+asyncpg://u:pw@example.com/db", "example.com", 5432, "u", "pw", "db"),
        ("POSTGRESQL://u:pw@example.com/db", "example.com", 5432, "u", "pw", "db"),
        ("postgresql://u:pw@example.com", "example.com", 5432, "u", "pw", "postgres"),
        ("postgresql://u:pw@example.com/", "example.com", 5432, "u", "pw", "postgres"),
        ("postgresql://u@example.com/db", "example.com", 5432, "u", None, "db"),
        ("postgresql://u:@example.com/db", "example.com", 5432, "u", "", "db"),
        (f"postgresql://u:{ENCODED}@example.com/db", "example.com", 5432, "u", PASSWORD, "db"),
        # A raw @ or / in the password still parses (the last @ ends the user info).
        ("postgresql://u:p@ss/w@example.com/db", "example.com", 5432, "u", "p@ss/w", "db"),
        ("postgresql://u:pw@[::1]:5433/db", "::1", 5433, "u", "pw", "db"),
        ("postgresql://u:pw@[2001:db8::5]/db", "2001:db8::5", 5432, "u", "pw", "db"),
        ("postgresql://u:pw@127.0.0.1:5433/my%20db", "127.0.0.1", 5433, "u", "pw", "my db"),
        ("postgresql://localhost/db", "localhost", 5432, "postgres", None, "db"),
        ("postgresql:///db?host=/var/run/postgresql", "/var/run/postgresql", 5432, "postgres",
         None, "db"),
        ("postgresql://u@%2Ftmp%2Fsock:5444/db", "/tmp/sock", 5444, "u", None, "db"),
        ("postgresql://u:pw@example.com/db?user=v&password=qq", "example.com", 5432, "v", "qq",
         "db"),
    ],
)  # fmt: skip
def test_url_forms(text, host, port, user, password, dbname):
    url = parse(text)
    assert (url.host, url.port, url.user, url.password, url.dbname) == (
        host,
        port,
        user,
        password,
        dbname,
    )


@pytest.mark.parametrize(
    ("text", "host", "port", "user", "password", "dbname"),
    [
        ("host=example.com user=u password=pw dbname=db", "example.com", 5432, "u", "pw", "db"),
        ("host=example.com port=6000 user=u", "example.com", 6000, "u", None, "postgres"),
        (f"host=example.com user=u password='{PASSWORD}'", "example.com", 5432, "u", PASSWORD,
         "postgres"),
        (r"host=example.com user=u password='it\'s a secret'", "example.com", 5432, "u",
         "it's a secret", "postgres"),
        ("host=/tmp port=5433", "/tmp", 5433, "postgres", None, "postgres"),
        ("hostaddr=127.0.0.1 port=5433 user=x", "127.0.0.1", 5433, "x", None, "postgres"),
    ],
)  # fmt: skip
def test_keyvalue_forms(text, host, port, user, password, dbname):
    url = parse(text)
    assert (url.host, url.port, url.user, url.password, url.dbname) == (
        host,
        port,
        user,
        password,
        dbname,
    )


def test_query_params_are_kept(ca_file):
    url = parse(
        f"postgresql://u:pw@example.com/db?sslmode=verify-full&sslrootcert={ca_file}"
        "&options=-c%20statement_timeout%3D0&application_name=mine&connect_timeout=3"
    )
    assert dict(url.params) == {
        "sslmode": "verify-full",
        "sslrootcert": ca_file,
        "options": "-c statement_timeout=0",
        "application_name": "mine",
        "connect_timeout": "3",
    }
    assert url.application_name == "mine"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("/var/run/postgresql", True),
        ("@abstract", True),
        ("example.com", False),
        ("10.0.0.1", False),
        ("2001:db8::5", False),
        ("db.abc.supabase.co", False),
        ("", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


def test_hostaddr_decides_loopback():
    url = parse("host=localhost hostaddr=192.0.2.7 user=u")
    assert not url.is_loopback
    assert url.params["sslmode"] == "require"


# -- classification -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint", "ref"),
    [
        (f"postgresql://postgres:pw@db.{REF}.supabase.co:5432/postgres", Endpoint.DIRECT, REF),
        (f"postgresql://postgres:pw@db.{REF}.supabase.co/postgres", Endpoint.DIRECT, REF),
        (f"postgresql://postgres:pw@db.{REF}.supabase.co:6543/postgres",
         Endpoint.TRANSACTION_POOLER, REF),
        (f"postgres://postgres.{REF}:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",
         Endpoint.SESSION_POOLER, REF),
        (f"postgres://postgres.{REF}:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
         Endpoint.TRANSACTION_POOLER, REF),
        (f"postgres://postgres.{REF}:pw@AWS-1-US-EAST-1.POOLER.SUPABASE.COM:6543/postgres",
         Endpoint.TRANSACTION_POOLER, REF),
        ("postgresql://u:pw@example.com:6543/db", Endpoint.SELF_HOSTED, None),
        ("postgresql://u:pw@localhost:5432/db", Endpoint.SELF_HOSTED, None),
    ],
)  # fmt: skip
def test_classification(text, endpoint, ref):
    url = parse(text)
    assert url.endpoint is endpoint
    assert url.project_ref == ref
    assert url.uses_transaction_pooler is (endpoint is Endpoint.TRANSACTION_POOLER)


def test_endpoint_override_for_self_hosted_pooler():
    url = parse("postgresql://u:pw@127.0.0.1:6432/db", endpoint=Endpoint.TRANSACTION_POOLER)
    assert url.uses_transaction_pooler
    assert url.describe() == "target 127.0.0.1:6432 (transaction pooler)"


def test_endpoint_accepts_its_string_value():
    assert Endpoint("transaction_pooler") is Endpoint.TRANSACTION_POOLER
    assert Endpoint("session_pooler") is Endpoint.SESSION_POOLER


def test_endpoint_named_by_a_user_is_one_sentence_without_the_value():
    assert Endpoint.named(" Transaction_Pooler ") is Endpoint.TRANSACTION_POOLER
    with pytest.raises(ConfigError) as info:  # a URL pasted into SUPABASE_DB_ENDPOINT
        Endpoint.named(f"postgresql://u:{SECRET}@example.com/db")
    assert SECRET not in str(info.value) and "transaction_pooler" in str(info.value)
    assert info.value.exit_code == 2


def test_pooler_needs_the_project_ref_in_the_user():
    with pytest.raises(ConfigError, match=r"postgres\.<project-ref>") as info:
        parse("postgres://postgres:hunter2@aws-0-us-east-1.pooler.supabase.com:6543/postgres")
    assert "hunter2" not in str(info.value)


def test_api_host_is_not_a_database():
    with pytest.raises(ConfigError, match=r"db\.abcdefghijklmnopqrst\.supabase\.co"):
        parse(f"postgresql://postgres:pw@{REF}.supabase.co:5432/postgres")


def test_describe():
    url = parse(f"postgresql://postgres:pw@db.{REF}.supabase.co:5432/postgres")
    assert url.describe() == f"target db.{REF}.supabase.co:5432 (direct)"
    assert parse("postgresql://u@[::1]:5433/x", label="source").describe() == (
        "source [::1]:5433 (self-hosted)"
    )


# -- SSL policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sslmode"),
    [
        ("postgresql://u:pw@example.com/db", "require"),
        (f"postgresql://postgres:pw@db.{REF}.supabase.co/postgres", "require"),
        ("postgresql://u:pw@example.com/db?sslmode=require", "require"),
        ("postgresql://u:pw@localhost/db", None),
        ("postgresql://u:pw@127.0.0.1/db", None),
        ("postgresql://u:pw@[::1]/db", None),
        ("host=/tmp user=u", None),
        ("postgresql://u:pw@localhost/db?sslmode=disable", "disable"),
        ("postgresql://u:pw@localhost/db?sslmode=prefer", "prefer"),
        ("postgresql://u:pw@localhost/db?sslmode=require", "require"),
    ],
)
def test_sslmode_defaults(text, sslmode):
    assert parse(text).sslmode == sslmode


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
def test_insecure_sslmode_refused_for_remote_hosts(mode):
    text = f"postgresql://u:hunter2@example.com/db?sslmode={mode}"
    with pytest.raises(ConfigError, match="--allow-insecure-ssl") as info:
        parse(text)
    assert "hunter2" not in str(info.value)
    # the UI has no flags: the variable that sets it there is named too
    assert "(SUPABASE_MIGRATION_ALLOW_INSECURE_SSL=1 in Dagster)" in str(info.value)
    assert parse(text, allow_insecure=True).sslmode == mode


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verifying_modes_need_an_existing_ca_file(mode, ca_file, tmp_path):
    with pytest.raises(ConfigError, match=r"prod-ca-2021\.crt"):
        parse(f"postgresql://u:pw@example.com/db?sslmode={mode}")
    with pytest.raises(ConfigError, match="does not exist"):
        parse(f"postgresql://u:pw@example.com/db?sslmode={mode}&sslrootcert={tmp_path}/none.crt")
    in_url = parse(f"postgresql://u:pw@example.com/db?sslmode={mode}&sslrootcert={ca_file}")
    assert in_url.params["sslrootcert"] == ca_file
    by_argument = parse(f"postgresql://u:pw@example.com/db?sslmode={mode}", sslrootcert=ca_file)
    assert (by_argument.sslmode, by_argument.params["sslrootcert"]) == (mode, ca_file)


def test_sslrootcert_argument_keeps_require_which_libpq_verifies(ca_file):
    url = parse("postgresql://u:pw@example.com/db", sslrootcert=ca_file)
    assert (url.sslmode, url.params["sslrootcert"]) == ("require", ca_file)


def test_system_ca_store_means_verify_full():
    url = parse("postgresql://u:pw@example.com/db?sslrootcert=system")
    assert url.sslmode == "verify-full"
    with pytest.raises(ConfigError, match="verify-full"):
        parse("postgresql://u:pw@example.com/db?sslrootcert=system&sslmode=require")


# -- malformed input ------------------------------------------------------------------------------

SECRET = "Zq9!secret"


@pytest.mark.parametrize(
    "text",
    [
        f"mysql://u:{SECRET}@example.com/db",
        f"http://u:{SECRET}@example.com/db",
        f"postgresql://u:{SECRET}@example.com:notaport/db",
        f"postgresql://u:{SECRET}@example.com:70000/db",
        f"postgresql://u:{SECRET}#x@example.com/db",
        f"postgresql://u:{SECRET} x@example.com/db",
        f"postgresql://u:{SECRET}@[::1/db",
        f"postgresql://u:{SECRET}@::1:5432/db",
        f"postgresql://u:{SECRET}@h1,h2/db",
        f"postgresql://u:{SECRET}@example.com/db?bogus_option=1",
        f"postgresql://u:{SECRET}@example.com/db?sslmode=sometimes",
        f"postgresql://u:{SECRET}@example.com/db?novalue",
        f"postgresql://u:{SECRET}@/db",
        f"postgresql://:{SECRET}@example.com/db",
        f"host=example.com password={SECRET} user",
        f"host=example.com password='{SECRET}",
        f"host=example.com password={SECRET} hostx=1",
        f"user=u password={SECRET}",
        f"just some text {SECRET}",
        "",
        "   ",
    ],
)
def test_malformed_input_is_one_sentence_without_the_password(text):
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert SECRET not in message
    assert SECRET[:4] not in message
    assert message.startswith("The target ")
    assert message.endswith(".")
    assert "\n" not in message
    assert not re.search(r"\.\s+[A-Z]", message), message
    assert info.value.exit_code == 2


def test_a_raw_question_mark_in_the_password_is_not_read_as_a_query():
    """What follows the '?' would have been named as an unknown setting: part of the password."""
    for password in ("Tr0ub4dor?xkcdpass=word", "2024?xkcdpass=word"):
        with pytest.raises(ConfigError, match="%3F") as info:
            parse(f"postgresql://u:{password}@example.com/db")
        assert "xkcdpass" not in str(info.value) and password[:4] not in str(info.value)
    assert parse("postgresql://u:Tr0ub4dor%3Fxkcdpass=word@example.com/db").password == (
        "Tr0ub4dor?xkcdpass=word"
    )
    # An '@' in a real query value still works: after user info, or after a host (and port).
    assert parse("postgresql://u:pw@example.com/db?application_name=a@b").host == "example.com"
    assert parse("postgresql://example.com/db?user=admin@server").user == "admin@server"
    assert parse("postgresql://example.com:6543/db?user=admin@server").port == 6543


def test_an_unknown_option_is_named_only_as_a_typo_of_a_real_one():
    """Any other unknown word was named, and may be a piece of a password left unencoded
    (a raw & in ?password=, a passphrase unquoted in key=value form)."""
    with pytest.raises(ConfigError, match=r"unknown setting sslmod \(did you mean sslmode\?\)"):
        parse("postgresql://u:pw@example.com/db?sslmod=require")
    for text in (
        "postgresql://u@example.com/db?password=Tr0ub4dor&Correcthorse=battery",
        "host=example.com user=u password=Tr0ub4dor Correcthorse=battery",
        "postgresql://u:pw@example.com/db?bogus_option=1",
    ):
        with pytest.raises(ConfigError, match="a setting libpq does not know") as info:
            parse(text)
        for piece in ("Correcthorse", "battery", "Tr0ub4dor", "bogus"):
            assert piece not in str(info.value), info.value


def test_missing_user_on_a_remote_host():
    with pytest.raises(ConfigError, match="no user name"):
        parse("postgresql://example.com/db")


# -- rendering ------------------------------------------------------------------------------------


def test_repr_and_str_never_show_the_password():
    url = parse(f"postgresql://u:{ENCODED}@example.com/db?sslpassword=keypass")
    for text in (repr(url), str(url), url.redacted(), url.describe(), f"{url}", f"{url!r}"):
        assert PASSWORD not in text
        assert ENCODED not in text
        assert "keypass" not in text
    assert (
        url.redacted() == "postgresql://u:***@example.com:5432/db?sslpassword=***&sslmode=require"
    )
    assert repr(url).startswith("DatabaseUrl('postgresql://u:***@example.com")


def test_redacted_forms():
    assert parse("postgresql://u@[::1]:5433/db").redacted() == "postgresql://u@[::1]:5433/db"
    socket = parse("host='/tmp/pg sock' port=5433 user=u dbname='my db'")
    assert socket.redacted() == "postgresql://u@%2Ftmp%2Fpg%20sock:5433/my%20db"
    # The redacted form parses back to the same place.
    again = parse(socket.redacted())
    assert (again.host, again.port, again.dbname) == ("/tmp/pg sock", 5433, "my db")


def test_not_picklable_but_copyable():
    url = parse("postgresql://u:hunter2@example.com/db")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(url)
    assert copy.deepcopy(url) is url
    assert copy.copy(url) == url


def test_params_are_read_only():
    url = parse("postgresql://u:pw@example.com/db")
    with pytest.raises(TypeError):
        url.params["sslmode"] = "disable"  # type: ignore[index]
    assert hash(url) == hash(parse("postgresql://u:pw@example.com/db"))


def test_conninfo_round_trips_through_libpq():
    url = parse(f"postgresql://u:{ENCODED}@[::1]:5433/my%20db?options=-c%20a%3Db")
    parsed = conninfo_to_dict(url.conninfo())
    assert parsed == {
        "host": "::1",
        "port": "5433",
        "user": "u",
        "dbname": "my db",
        "password": PASSWORD,
        "application_name": DEFAULT_APPLICATION_NAME,
        "options": "-c a=b",
    }
    without = conninfo_to_dict(url.conninfo(with_password=False, connect_timeout=3, options=None))
    assert "password" not in without
    assert without["connect_timeout"] == "3"
    assert "options" not in without


def test_sqlalchemy_urls():
    url = parse(f"postgresql://u:{ENCODED}@example.com:6000/db?sslmode=require")
    sa = url.sqlalchemy_url()
    assert sa.drivername == "postgresql+psycopg"
    assert (sa.username, sa.password, sa.host, sa.port, sa.database) == (
        "u",
        PASSWORD,
        "example.com",
        6000,
        "db",
    )
    assert dict(sa.query) == {"application_name": DEFAULT_APPLICATION_NAME, "sslmode": "require"}
    assert PASSWORD not in str(sa) and PASSWORD not in repr(sa)
    assert make_url(sa.render_as_string(hide_password=False)).password == PASSWORD
    assert url.async_sqlalchemy_url().drivername == "postgresql+psycopg"


def test_libpq_env(ca_file):
    url = parse(
        f"postgresql://u:{ENCODED}@example.com:6000/db?sslmode=verify-full"
        f"&sslrootcert={ca_file}&options=-c%20x%3Dy&keepalives=1"
    )
    assert url.libpq_env() == {
        "PGHOST": "example.com",
        "PGPORT": "6000",
        "PGUSER": "u",
        "PGDATABASE": "db",
        "PGPASSWORD": PASSWORD,
        "PGAPPNAME": DEFAULT_APPLICATION_NAME,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": ca_file,
        "PGOPTIONS": "-c x=y",
    }
    assert "PGPASSWORD" not in parse("postgresql://u@localhost/db").libpq_env()


def test_conninfo_is_accepted_by_psycopg():
    # make_conninfo output must be a string libpq itself parses (quoting of odd passwords).
    url = parse("host=localhost user=u password='a b\\'c\\\\d'")
    assert psycopg.conninfo.conninfo_to_dict(url.conninfo())["password"] == "a b'c\\d"


def test_prisma_pgbouncer_flag_marks_the_transaction_pooler():
    url = parse("postgresql://u:pw@example.com:6543/db?pgbouncer=true")
    assert url.uses_transaction_pooler
    assert "pgbouncer" not in url.params


def test_relative_ca_path_is_made_absolute(ca_file, monkeypatch):
    monkeypatch.chdir(Path(ca_file).parent)
    url = parse("postgresql://u:pw@example.com/db?sslmode=verify-full&sslrootcert=prod-ca-2021.crt")
    assert url.params["sslrootcert"] == ca_file
