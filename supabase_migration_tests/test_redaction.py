"""Passwords and row values (PHI) never reach a message: table-driven, then against a server."""

from __future__ import annotations

import re

import psycopg
import psycopg.errors as pg_errors
import pytest
from psycopg.pq import DiagnosticField as F

from supabase_migration.errors import CopyError
from supabase_migration.redaction import (
    condition_name,
    describe_pg_error,
    redact_text,
    redacted_output,
)

from .testbed import require

PHI = ["Jane Q. Patient", "123-45-6789", "Jane", "Patient", "1961-02-03", "555-0100", "999"]


def assert_phi_free(text: str) -> None:
    for value in PHI:
        assert value not in text, f"{value!r} leaked into {text!r}"
    assert "DETAIL" not in text and "CONTEXT" not in text and "\n" not in text


# -- redact_text ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("postgresql://u:hunter2@db.example.com:5432/app", (),
         "postgresql://u:***@db.example.com:5432/app"),
        ("see postgres://postgres.abc:pw@aws-0-x.pooler.supabase.com:6543/postgres now", (),
         "see postgres://postgres.abc:***@aws-0-x.pooler.supabase.com:6543/postgres now"),
        ("postgresql+psycopg://u:p@ss@h/db", (), "postgresql+psycopg://u:***@h/db"),
        ("postgresql://:onlypw@h/db", (), "postgresql://:***@h/db"),
        ("postgresql://u@h/db stays", (), "postgresql://u@h/db stays"),
        ("host=h password=hunter2 user=u", (), "host=h password=*** user=u"),
        ("host=h password='hunter 2' user=u", (), "host=h password=*** user=u"),
        ("PGPASSWORD=hunter2 pg_dump", (), "PGPASSWORD=*** pg_dump"),
        ("SUPABASE_DB_PASSWORD=hunter2", (), "SUPABASE_DB_PASSWORD=***"),
        ('{"password": "hunter2", "user": "u"}', (), '{"password": ***, "user": "u"}'),
        ("sslpassword=keypass", (), "sslpassword=***"),
        ("failed for hunter2 and hunter2", ("hunter2",), "failed for *** and ***"),
        ("encoded p%40ss%2Fw%25rd%23x%3A1 raw p@ss/w%rd#x:1", ("p@ss/w%rd#x:1",),
         "encoded *** raw ***"),
        ("plus form a+b%2Fc", ("a b/c",), "plus form ***"),
        ("password authentication failed for user \"u\"", (),
         "password authentication failed for user \"u\""),
        ("fe_sendauth: no password supplied", (), "fe_sendauth: no password supplied"),
        ("nothing here", ("", None), "nothing here"),
        ("", ("x",), ""),
    ],
)  # fmt: skip
def test_redact_text(text, secrets, expected):
    assert redact_text(text, [s for s in secrets if s]) == expected


# -- describe_pg_error: table-driven with real PostgreSQL texts ----------------------------------


def fake(cls: type[psycopg.Error], fields: dict[F, str], full_text: str) -> psycopg.Error:
    """A psycopg error carrying a server report, as psycopg builds it from a PGresult."""
    info = {key: value.encode() for key, value in fields.items()}
    if cls.sqlstate:
        info.setdefault(F.SQLSTATE, cls.sqlstate.encode())
    return cls(full_text, info=info)


CASES = [
    (
        pg_errors.UniqueViolation,
        {
            F.MESSAGE_PRIMARY: 'duplicate key value violates unique constraint "patients_ssn_key"',
            F.MESSAGE_DETAIL: "Key (ssn)=(123-45-6789) already exists.",
            F.SCHEMA_NAME: "public",
            F.TABLE_NAME: "patients",
            F.CONSTRAINT_NAME: "patients_ssn_key",
        },
        "unique_violation (23505) on public.patients, constraint patients_ssn_key: duplicate "
        'key value violates unique constraint "patients_ssn_key"',
    ),
    (
        pg_errors.NotNullViolation,
        {
            F.MESSAGE_PRIMARY: 'null value in column "ssn" of relation "patients" violates '
            "not-null constraint",
            F.MESSAGE_DETAIL: "Failing row contains (7, Jane Q. Patient, null, 1961-02-03).",
            F.SCHEMA_NAME: "public",
            F.TABLE_NAME: "patients",
            F.COLUMN_NAME: "ssn",
        },
        'not_null_violation (23502) on public.patients, column ssn: null value in column "ssn" '
        'of relation "patients" violates not-null constraint',
    ),
    (
        pg_errors.CheckViolation,
        {
            F.MESSAGE_PRIMARY: 'new row for relation "patients" violates check constraint '
            '"ssn_format"',
            F.MESSAGE_DETAIL: "Failing row contains (7, Jane Q. Patient, 123-45-6789).",
            F.SCHEMA_NAME: "public",
            F.TABLE_NAME: "patients",
            F.CONSTRAINT_NAME: "ssn_format",
        },
        "check_violation (23514) on public.patients, constraint ssn_format: new row for "
        'relation "patients" violates check constraint "ssn_format"',
    ),
    (
        pg_errors.ForeignKeyViolation,
        {
            F.MESSAGE_PRIMARY: 'insert or update on table "visits" violates foreign key '
            'constraint "visits_patient_id_fkey"',
            F.MESSAGE_DETAIL: 'Key (patient_id)=(999) is not present in table "patients".',
            F.SCHEMA_NAME: "public",
            F.TABLE_NAME: "visits",
            F.CONSTRAINT_NAME: "visits_patient_id_fkey",
        },
        "foreign_key_violation (23503) on public.visits, constraint visits_patient_id_fkey: "
        'insert or update on table "visits" violates foreign key constraint '
        '"visits_patient_id_fkey"',
    ),
    (
        pg_errors.InvalidTextRepresentation,
        {
            F.MESSAGE_PRIMARY: 'invalid input syntax for type integer: "Jane Q. Patient"',
            F.CONTEXT: 'COPY patients, line 1, column id: "Jane Q. Patient"',
        },
        "invalid_text_representation (22P02): invalid input syntax for type integer",
    ),
    (
        pg_errors.InvalidTextRepresentation,
        {F.MESSAGE_PRIMARY: 'invalid input value for enum mood: "Jane"'},
        "invalid_text_representation (22P02): invalid input value for enum mood",
    ),
    (
        pg_errors.StringDataRightTruncation,
        {F.MESSAGE_PRIMARY: "value too long for type character varying(5)"},
        "string_data_right_truncation (22001): value too long for type character varying(5)",
    ),
    (
        pg_errors.NumericValueOutOfRange,
        {F.MESSAGE_PRIMARY: 'value "123456789999" is out of range for type integer'},
        'numeric_value_out_of_range (22003): value "…" is out of range for type integer',
    ),
    (
        pg_errors.DatetimeFieldOverflow,
        {F.MESSAGE_PRIMARY: 'date/time field value out of range: "1961-02-33"'},
        "datetime_field_overflow (22008): date/time field value out of range",
    ),
    (
        pg_errors.CharacterNotInRepertoire,
        {F.MESSAGE_PRIMARY: 'invalid byte sequence for encoding "UTF8": 0x00'},
        'character_not_in_repertoire (22021): invalid byte sequence for encoding "UTF8"',
    ),
    (  # a quoted word after "encoding" that is no encoding's name is not kept
        pg_errors.CharacterNotInRepertoire,
        {F.MESSAGE_PRIMARY: 'value for encoding "Jane" is wrong'},
        'character_not_in_repertoire (22021): value for encoding "…" is wrong',
    ),
    (
        pg_errors.UntranslatableCharacter,
        {
            F.MESSAGE_PRIMARY: 'character with byte sequence 0xe2 0x80 0x9c in encoding "UTF8" '
            'has no equivalent in encoding "LATIN1"'
        },
        "untranslatable_character (22P05): character with byte sequence 0x… 0x… 0x… in "
        'encoding "UTF8" has no equivalent in encoding "LATIN1"',
    ),
    (
        pg_errors.BadCopyFileFormat,
        {
            F.MESSAGE_PRIMARY: "extra data after last expected column",
            F.CONTEXT: 'COPY patients, line 3: "7\tJane Q. Patient\t123-45-6789"',
        },
        "bad_copy_file_format (22P04): extra data after last expected column",
    ),
    (
        pg_errors.SyntaxError,
        {F.MESSAGE_PRIMARY: 'syntax error at or near "Jane"'},
        'syntax_error (42601): syntax error at or near "…"',
    ),
    (
        pg_errors.UndefinedColumn,
        {F.MESSAGE_PRIMARY: 'column "jane" does not exist'},
        'undefined_column (42703): column "…" does not exist',
    ),
    (
        pg_errors.RaiseException,
        {F.MESSAGE_PRIMARY: "SSN 123-45-6789 of Jane Q. Patient is invalid"},
        "raise_exception (P0001): message from a trigger or function withheld",
    ),
    (
        pg_errors.SerializationFailure,
        {F.MESSAGE_PRIMARY: "could not serialize access due to concurrent update"},
        "serialization_failure (40001): could not serialize access due to concurrent update",
    ),
    (
        pg_errors.DeadlockDetected,
        {
            F.MESSAGE_PRIMARY: "deadlock detected",
            F.MESSAGE_DETAIL: "Process 1 waits for ShareLock; blocked by process 2.",
        },
        "deadlock_detected (40P01): deadlock detected",
    ),
    (
        pg_errors.AdminShutdown,
        {F.MESSAGE_PRIMARY: "terminating connection due to administrator command"},
        "admin_shutdown (57P01): terminating connection due to administrator command",
    ),
    (
        pg_errors.ProtocolViolation,
        {F.MESSAGE_PRIMARY: "server conn crashed?"},
        "protocol_violation (08P01): server conn crashed?",
    ),
    (
        pg_errors.InsufficientPrivilege,
        {F.MESSAGE_PRIMARY: "permission denied for table patients"},
        "insufficient_privilege (42501): permission denied for table patients",
    ),
]


@pytest.mark.parametrize(("cls", "fields", "expected"), CASES)
def test_describe_pg_error_table(cls, fields, expected):
    lines = [fields[F.MESSAGE_PRIMARY]]
    if F.MESSAGE_DETAIL in fields:
        lines.append(f"DETAIL:  {fields[F.MESSAGE_DETAIL]}")
    if F.CONTEXT in fields:
        lines.append(f"CONTEXT:  {fields[F.CONTEXT]}")
    described = describe_pg_error(fake(cls, fields, "\n".join(lines)))
    assert described == expected
    assert_phi_free(described)


def test_context_prefix():
    exc = fake(
        pg_errors.UniqueViolation,
        {F.MESSAGE_PRIMARY: "duplicate key value violates unique constraint", F.TABLE_NAME: "t"},
        "x",
    )
    assert describe_pg_error(exc, context="copying public.t").startswith(
        "copying public.t: unique_violation (23505) on t"
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            psycopg.OperationalError(
                "consuming input failed: server closed the connection unexpectedly"
            ),
            "OperationalError: consuming input failed: server closed the connection "
            "unexpectedly",
        ),
        (psycopg.OperationalError("the connection is closed"),
         "OperationalError: the connection is closed"),
        (psycopg.DataError("date too large (after year 10K): '123456-01-01'"),
         "DataError: date too large (after year 10K)"),
        (psycopg.ProgrammingError("can't adapt type 'Patient'"),
         "ProgrammingError: can't adapt type \"…\""),
        (ValueError("invalid literal for int() with base 10: 'Jane Q. Patient'"),
         'ValueError: invalid literal for int() with base 10: "…"'),
        (KeyError("123-45-6789"), 'KeyError: "…"'),
        (RuntimeError("postgresql://u:hunter2@h/db failed"),
         "RuntimeError: postgresql://u:***@h/db failed"),
        (RuntimeError(), "RuntimeError"),
        (CopyError("Copying public.t failed."), "Copying public.t failed"),
    ],
)  # fmt: skip
def test_describe_client_side_errors(exc, expected):
    described = describe_pg_error(exc)
    assert described == expected
    assert "hunter2" not in described
    assert_phi_free(described)


def test_unterminated_quote_drops_the_rest():
    exc = pg_errors.InvalidTextRepresentation(
        "x", info={F.MESSAGE_PRIMARY: b'bad value "Jane Q. Patient and more', F.SQLSTATE: b"22P02"}
    )
    assert describe_pg_error(exc) == "invalid_text_representation (22P02): bad value"


def test_condition_names():
    assert condition_name("23505") == "unique_violation"
    assert condition_name("57P03") == "cannot_connect_now"
    assert condition_name("XX000") == "internal_error"
    assert condition_name("22037") == "non_unique_keys_in_a_json_object"
    assert condition_name("ZZ999") is None


# -- against a real server ------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE patients (
    id integer PRIMARY KEY,
    name varchar(40) NOT NULL,
    ssn text UNIQUE CHECK (ssn ~ '^[0-9]{3}-[0-9]{2}-[0-9]{4}$'),
    born date,
    short_code varchar(5)
);
CREATE TABLE visits (id integer PRIMARY KEY, patient_id integer REFERENCES patients(id));
CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.name = 'Jane Q. Patient' AND NEW.id = 99 THEN
        RAISE EXCEPTION 'patient % with ssn % is blocked', NEW.name, NEW.ssn;
    END IF;
    IF NEW.id = 98 THEN  -- a standard condition, with the author's words
        RAISE EXCEPTION 'patient % already booked', NEW.name USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER shout BEFORE INSERT ON patients FOR EACH ROW EXECUTE FUNCTION shout();
INSERT INTO patients VALUES (1, 'Jane Q. Patient', '123-45-6789', '1961-02-03', 'ab');
"""

SERVER_CASES = [
    ("INSERT INTO patients VALUES (2, 'Jane Q. Patient', '123-45-6789', NULL, NULL)",
     "unique_violation (23505)", "patients_ssn_key"),
    ("INSERT INTO patients VALUES (3, NULL, '555-0100', NULL, NULL)",
     "not_null_violation (23502)", "column name"),
    ("INSERT INTO patients VALUES (4, 'Jane Q. Patient', 'Jane 555-0100', NULL, NULL)",
     "check_violation (23514)", "patients_ssn_check"),
    ("INSERT INTO patients VALUES ('Jane Q. Patient', 'x', NULL, NULL, NULL)",
     "invalid_text_representation (22P02)", "integer"),
    ("INSERT INTO patients VALUES (5, 'Jane Q. Patient', NULL, '1961-02-33', NULL)",
     "datetime_field_overflow (22008)", "date/time"),
    ("INSERT INTO patients VALUES (6, 'Jane Q. Patient', NULL, NULL, '123-45-6789')",
     "string_data_right_truncation (22001)", "character varying(5)"),
    ("INSERT INTO visits VALUES (1, 999)",
     "foreign_key_violation (23503)", "visits_patient_id_fkey"),
    ("INSERT INTO patients VALUES (99, 'Jane Q. Patient', '123-45-0000', NULL, NULL)",
     "raise_exception (P0001)", "withheld"),
    ("INSERT INTO patients VALUES (98, 'Jane Q. Patient', '123-45-0001', NULL, NULL)",
     "unique_violation (23505)", "withheld"),
    ("SELECT 'Jane Q. Patient'::integer", "invalid_text_representation (22P02)", "integer"),
    ("SELECT '123-45-6789 Jane'::jsonb", "invalid_text_representation (22P02)", "json"),
    ("SELECT * FROM patients WHERE name = Jane", "undefined_column (42703)", "does not exist"),
    # the encodings are named (what to fix), the bytes of the value are not
    ("SELECT convert_to('Jane Q. Patient €', 'LATIN1')", "untranslatable_character (22P05)",
     'with byte sequence 0x… 0x… 0x… in encoding "UTF8" has no equivalent in encoding "LATIN1"'),
    ("SELECT convert_from('\\xff4a616e65'::bytea, 'UTF8')", "character_not_in_repertoire",
     'invalid byte sequence for encoding "UTF8"'),
    # a value with quotes of its own, which the server does not double: where it seems to
    # end, it goes on (the messages said `"…"Patient"…"Month` and `"…" Q. Patient`)
    ("SELECT to_date('01 J\"Patient 1961', 'DD Month YYYY')", "invalid_datetime_format (22007)",
     'invalid value "…"'),
    ("SELECT '\"Jane\"\" Q. Patient\"'::regclass", "undefined_table (42P01)",
     'relation "…" does not exist'),
    ("SELECT '\"Jane\"\" Q. Patient\"'::regtype", "undefined_object (42704)",
     'type "…" does not exist'),
    # a setting is named (what to look up), the value given it is not
    ("SET DateStyle = 'Jane Q. Patient'", "invalid_parameter_value (22023)",
     'invalid value for parameter "DateStyle"'),
    ("SET ROLE pg_read_all_data; SET log_statement = 'all'", "insufficient_privilege (42501)",
     'permission denied to set parameter "log_statement"'),
    ("SET app.patient = 'Jane Q. Patient'; SET max_connections = 7", "cant_change_runtime_param",
     'parameter "max_connections" cannot be changed without restarting the server'),
    ("SELECT current_setting('Jane Q. Patient')", "undefined_object (42704)",
     'unrecognized configuration parameter "…"'),
    ("SELECT current_setting('app.' || name) FROM patients", "undefined_object (42704)",
     'unrecognized configuration parameter "…"'),
    ("SELECT current_setting(replace(name, ' ', '_')) FROM patients", "undefined_object",
     'unrecognized configuration parameter "…"'),
    # RAISE naming a value in the fields it sets: the fields are the author's words too
    *((f"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = 'check_violation', {field} = "
       "(SELECT ssn FROM patients); END $$", "check_violation (23514): message", "withheld")
      for field in ("TABLE", "COLUMN", "CONSTRAINT", "SCHEMA", "DATATYPE")),
    # dynamic SQL built from a value: the server names it unquoted (column p.<value>)
    ("DO $$ BEGIN EXECUTE 'SELECT p.x' || (SELECT replace(ssn, '-', '_') FROM patients) "
     "|| ' FROM patients p'; END $$", "undefined_column (42703)", "dynamic SQL withheld"),
    ("DO $$ BEGIN EXECUTE 'SELECT x' || (SELECT replace(ssn, '-', '_') FROM patients) "
     "|| '()'; END $$", "undefined_function (42883)", "dynamic SQL withheld"),
]  # fmt: skip


@pytest.fixture
def phi_db(source_db):
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return source_db


@pytest.mark.parametrize(("sql", "head", "names"), SERVER_CASES)
def test_real_server_errors_never_carry_values(phi_db, sql, head, names):
    with (
        psycopg.connect(phi_db.url, autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
    ):
        conn.execute(sql)
    described = describe_pg_error(info.value, context="copying public.patients")
    assert described.startswith(f"copying public.patients: {head}")
    assert names in described
    assert_phi_free(described)
    assert not re.search(r"\.\s+[A-Z]", described)


# What procedural-language code raises: the author's words, with NEW's values in them. Each is
# withheld whatever its SQLSTATE (a raise may claim a standard condition).
PL_RAISES = {
    "plpython3u": [
        "plpy.error('ssn %s blocked' % TD['new']['ssn'])",
        "raise ValueError('ssn %s blocked' % TD['new']['ssn'])",
        "plpy.error('ssn %s taken' % TD['new']['ssn'], sqlstate='23505')",
    ],
    "plperl": [
        'die "ssn $_TD->{new}{ssn} blocked\\n";',
        'elog(ERROR, "ssn $_TD->{new}{ssn} blocked");',
    ],
    "pltcl": ['error "ssn $NEW(ssn) blocked"', 'elog ERROR "ssn $NEW(ssn) blocked"'],
}
PL_PACKAGES = {
    "plpython3u": "postgresql-plpython3-{}",
    "plperl": "postgresql-plperl-{}",
    "pltcl": "postgresql-pltcl-{}",
}


@pytest.mark.parametrize(
    ("language", "body"),
    [(language, body) for language, bodies in PL_RAISES.items() for body in bodies],
)
def test_procedural_language_raises_are_withheld(source_db, language: str, body: str) -> None:
    """PL/Python, PL/Perl and PL/Tcl report what user code raised from their own source
    files; that message is withheld like PL/pgSQL's RAISE."""
    with psycopg.connect(source_db.url, autocommit=True) as conn:
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = %s", [language]
        ).fetchone()
        package = PL_PACKAGES[language].format(conn.info.server_version // 10000)
        require(available is not None, f"{language} is not installed (Debian: {package})")
        conn.execute(f"CREATE EXTENSION IF NOT EXISTS {language}")
        conn.execute("CREATE TABLE booked (id integer, ssn text)")
        conn.execute(
            f"CREATE FUNCTION guard() RETURNS trigger LANGUAGE {language} AS $f$\n{body}\n$f$"
        )
        conn.execute(
            "CREATE TRIGGER guard BEFORE INSERT ON booked FOR EACH ROW EXECUTE FUNCTION guard()"
        )
        with pytest.raises(psycopg.Error) as info:
            conn.execute("INSERT INTO booked VALUES (1, '123-45-6789')")
    assert "123-45-6789" in str(info.value)  # the server's own text carries the value
    described = describe_pg_error(info.value, context="copying public.booked")
    assert described.endswith("message from a trigger or function withheld"), described
    assert_phi_free(described)


def test_real_copy_error_with_row_in_context(phi_db):
    with (
        psycopg.connect(phi_db.url, autocommit=True) as conn,
        pytest.raises(psycopg.Error) as info,
        conn.cursor().copy("COPY patients (id, name, ssn) FROM STDIN") as copy,
    ):
        copy.write("7\tJane Q. Patient\t123-45-6789\textra\n")
    assert "Jane Q. Patient" in str(info.value)  # the server quotes the row in CONTEXT
    described = describe_pg_error(info.value)
    assert described.startswith("bad_copy_file_format (22P04)")
    assert_phi_free(described)


def test_output_masks_a_secret_printed_in_pieces(capsys):
    """The masking stream masked each write whole: `print("password=", pw[:3], pw[3:],
    sep="")`, as a user's env.py may log a URL it assembles, passed the password through."""
    import sys

    with redacted_output(["s3cr3t-pw"]):
        print("url=postgresql://postgres:", "s3c", "r3t-pw", "@db:5432/app", sep="")
        sys.stderr.write("s3cr")
        sys.stderr.flush()
        sys.stderr.write("3t-pw unfinished")
    out, err = capsys.readouterr()
    assert "s3cr3t-pw" not in out and "s3cr" not in out and "url=postgresql://postgres:" in out
    assert "s3cr" not in err and err.endswith(" unfinished")


def test_the_password_as_sqlalchemy_renders_it_is_masked():
    """The URL Alembic's env.py is given is SQLAlchemy's rendering, which keeps spaces raw and
    percent-encodes '!' (and '&', '=', quotes, non-ASCII): no form of the password masked
    before, and the URL pattern stops at white space."""
    from sqlalchemy.engine import URL

    passphrase = "correct horse battery staple!"
    url = URL.create(
        "postgresql+psycopg", username="postgres", password=passphrase, host="db", database="d"
    ).render_as_string(hide_password=False)
    assert "horse battery" in url
    assert "horse battery" not in redact_text(f"alembic url: {url}", [passphrase])
