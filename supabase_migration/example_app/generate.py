"""Deterministic synthetic data for the example clinic app, streamed with COPY.

The same ``seed`` and ``rows`` always give byte-identical table contents, so tests can compare
two databases by hash and the demo is reproducible. Nothing is held in memory beyond one row:
each table is a generator feeding ``COPY ... FROM STDIN``, and rows that point at a patient
recompute that patient's uuid from its index instead of looking it up.

Every value is obviously synthetic (``example.test`` e-mails, ``555`` phone numbers, ``MRN``
numbers), but shaped like PHI: names with non-ASCII letters and apostrophes, addresses in
jsonb, allergy arrays, free-text notes with tabs, newlines and backslashes, NULLs.

    python -m supabase_migration.example_app.generate postgresql://... --rows 100000 --seed 7
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from random import Random

import psycopg
from psycopg import sql

__all__ = ["SHARES", "generate", "plan_counts"]

# Share of the total row count per table, in foreign-key order.
SHARES: dict[str, float] = {
    "providers": 0.01,
    "patients": 0.15,
    "appointments": 0.35,
    "prescriptions": 0.25,
    "lab_results": 0.14,
    "vital_readings": 0.10,
}

# All timestamps are offsets from a fixed instant, never now(): output depends on seed only.
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
_DOB_BASE = date(1930, 1, 1)
_RX_BASE = date(2024, 1, 1)

_FIRST_NAMES = (
    "Olivia", "Liam", "Emma", "Noah", "Ava", "Mateo", "Sofia", "Lucas", "Mia", "Ethan",
    "Amara", "Kenji", "Priya", "Omar", "Fatima", "Hannah", "José", "Zoë", "Chloé", "Björn",
    "Łukasz", "Aoife", "Siobhán", "François", "Renée", "Jürgen", "Søren", "Ana", "Wei", "美玲",
)  # fmt: skip
_LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Wilson",
    "Anderson", "Thomas", "Taylor", "Moore", "Martin", "Lee", "Patel", "Kim", "Nguyen", "Cohen",
    "O'Brien", "García", "Müller", "Núñez", "Ødegaard", "Schäfer", "D'Angelo", "Nguyễn", "李",
    "王", "Kowalczyk",
)  # fmt: skip
_SPECIALTIES = (
    "family_medicine", "internal_medicine", "pediatrics", "cardiology", "dermatology",
    "oncology", "psychiatry", "radiology",
)  # fmt: skip
_SEXES = ("female", "male", "female", "male", "intersex", "unknown")
_STATUSES = (
    "completed", "completed", "completed", "completed", "scheduled", "scheduled",
    "checked_in", "cancelled", "no_show",
)  # fmt: skip
_DURATIONS = tuple(timedelta(minutes=m) for m in (15, 20, 30, 30, 30, 45, 60))
_NOTES = (
    "Follow-up in 2 weeks.",
    "BP re-check requested.\nPatient reports dizziness on standing.",
    'Patient said "feeling fine"\tno acute distress.',
    "Refill authorised; see chart C:\\scans\\2024\\ for the referral letter.",
    "Interpreter needed (español).",
    "Annual physical. No concerns.",
    "Discussed diet & exercise; HbA1c 6.1%.",
)
_STREETS = ("Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Elm St", "Rue de la Paix", "Hauptstraße")
_CITIES = (
    ("Springfield", "IL"), ("Riverside", "CA"), ("Fairview", "TX"), ("Madison", "WI"),
    ("Georgetown", "KY"), ("Salem", "OR"), ("Franklin", "TN"), ("Clinton", "NY"),
)  # fmt: skip
_ALLERGENS = ("penicillin", "peanuts", "latex", "sulfa drugs", "shellfish", "aspirin", "pollen")
_ALLERGENS_QUOTED = tuple(f'"{a}"' for a in _ALLERGENS)
_DRUGS = (
    ("RX197361", "amlodipine", "mg"), ("RX860975", "metformin", "mg"),
    ("RX617314", "atorvastatin", "mg"), ("RX310965", "ibuprofen", "mg"),
    ("RX198211", "simvastatin", "mg"), ("RX966247", "levothyroxine", "mcg"),
    ("RX311671", "lisinopril", "mg"), ("RX896188", "amoxicillin", "mg"),
    ("RX1049630", "insulin glargine", "units"), ("RX745679", "albuterol", "puffs"),
)  # fmt: skip
_SIGS = ("once daily", "twice daily", "every 8 hours", "at bedtime", "as needed for pain")
_ROUTES = ("oral", "oral", "oral", "subcutaneous", "inhaled", "topical")
# (LOINC-like code, unit, low, high): results are drawn around the reference range.
_LAB_TESTS = (
    ("2345-7", "mg/dL", 70.0, 99.0),  # glucose
    ("2160-0", "mg/dL", 0.6, 1.3),  # creatinine
    ("718-7", "g/dL", 12.0, 17.5),  # hemoglobin
    ("2093-3", "mg/dL", 125.0, 200.0),  # cholesterol
    ("4548-4", "%", 4.0, 5.6),  # HbA1c
    ("6690-2", "10*3/uL", 4.5, 11.0),  # leukocytes
    ("2823-3", "mmol/L", 3.5, 5.1),  # potassium
    ("1742-6", "U/L", 7.0, 56.0),  # ALT
)
_VITALS = (
    ("heart_rate", 72.0, 12.0),
    ("spo2", 97.0, 1.5),
    ("systolic_bp", 122.0, 15.0),
    ("diastolic_bp", 79.0, 10.0),
    ("temperature_c", 36.8, 0.4),
    ("resp_rate", 15.0, 3.0),
)

Row = tuple[object, ...]


def plan_counts(rows: int) -> dict[str, int]:
    """Rows per table for a total of ``rows`` (at least one provider and one patient)."""
    if rows < 0:
        raise ValueError("rows must be >= 0")
    counts = {name: round(rows * share) for name, share in SHARES.items()}
    counts["providers"] = max(1, counts["providers"])
    counts["patients"] = max(1, counts["patients"])
    # Rounding may overshoot or undershoot: the leaf tables absorb the difference.
    counts["vital_readings"] += rows - sum(counts.values())
    leaves = ("vital_readings", "lab_results", "prescriptions", "appointments")
    for name, previous in itertools.pairwise(leaves):
        if counts[name] < 0:
            counts[previous] += counts[name]
            counts[name] = 0
    counts["appointments"] = max(0, counts["appointments"])  # rows < 2: a little over
    if counts["appointments"] == 0:  # nothing for a prescription to point at
        counts["vital_readings"] += counts["prescriptions"]
        counts["prescriptions"] = 0
    return counts


class _Ids:
    """Patient uuids recomputed from their index (a keyed hash), so none are stored."""

    def __init__(self, seed: int) -> None:
        self._key = hashlib.blake2b(f"clinic-patients:{seed}".encode(), digest_size=32).digest()

    def patient(self, index: int) -> str:
        """The uuid of patient ``index`` as text, version 4 (COPY takes text cheapest)."""
        h = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=16, key=self._key).hexdigest()
        # Same value as str(uuid.UUID(bytes=digest, version=4)): version nibble 4, variant 10.
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _rng(seed: int, table: str) -> Random:
    # A string seed is hashed with SHA-512 by Random: stable across runs and Python versions.
    return Random(f"{seed}:{table}")


def _providers(seed: int, counts: dict[str, int]) -> Iterator[Row]:
    rng = _rng(seed, "providers")
    r = rng.random
    for i in range(1, counts["providers"] + 1):
        first = _FIRST_NAMES[int(r() * len(_FIRST_NAMES))]
        last = _LAST_NAMES[int(r() * len(_LAST_NAMES))]
        yield (
            i,
            f"1{i:09d}",  # NPI-shaped, unique by construction
            f"Dr. {first} {last}",
            _SPECIALTIES[int(r() * len(_SPECIALTIES))],
            EPOCH - timedelta(days=int(r() * 3650), seconds=int(r() * 86400)),
        )


def _patients(seed: int, counts: dict[str, int]) -> Iterator[Row]:
    rng = _rng(seed, "patients")
    r = rng.random
    ids = _Ids(seed)
    for i in range(counts["patients"]):
        first = _FIRST_NAMES[int(r() * len(_FIRST_NAMES))]
        last = _LAST_NAMES[int(r() * len(_LAST_NAMES))]
        local = f"{first}.{last}".lower().replace("'", "").replace(" ", "")
        email = None if r() < 0.1 else f"{local}{i}@example.test"
        phone = None if r() < 0.05 else f"+1-555-{int(r() * 1000):03d}-{int(r() * 10000):04d}"
        if r() < 0.08:
            address = None
        else:
            city, state = _CITIES[int(r() * len(_CITIES))]
            # JSON written directly: every piece is free of quotes and backslashes.
            line1 = f"{1 + int(r() * 9999)} {_STREETS[int(r() * len(_STREETS))]}"
            postal = f"{int(r() * 100000):05d}"
            line2 = f', "line2": "Apt {1 + int(r() * 400)}"' if r() < 0.2 else ""
            address = (
                f'{{"line1": "{line1}"{line2}, "city": "{city}", "state": "{state}", '
                f'"postal_code": "{postal}", "country": "US"}}'
            )
        roll = r()
        if roll < 0.2:
            allergies = None
        elif roll < 0.6:
            allergies = "{}"
        else:
            # A text[] literal; psycopg's list dumper costs more than the whole rest of the row.
            allergies = "{" + ",".join(rng.sample(_ALLERGENS_QUOTED, 1 + int(r() * 3))) + "}"
        created = EPOCH - timedelta(days=int(r() * 2000), seconds=int(r() * 86400))
        yield (
            ids.patient(i),
            f"MRN{i:08d}",
            first,
            last,
            _DOB_BASE + timedelta(days=int(r() * 33000)),
            _SEXES[int(r() * len(_SEXES))],
            email,
            phone,
            address,
            allergies,
            created,
            created + timedelta(days=int(r() * 300), seconds=int(r() * 86400)),
        )


def _appointments(seed: int, counts: dict[str, int]) -> Iterator[Row]:
    rng = _rng(seed, "appointments")
    r = rng.random
    ids = _Ids(seed)
    n_patients, n_providers = counts["patients"], counts["providers"]
    slots = 4 * 24 * 365 * 2  # quarter-hour slots over two years from EPOCH
    for i in range(1, counts["appointments"] + 1):
        yield (
            i,
            ids.patient(int(r() * n_patients)),
            1 + int(r() * n_providers),
            EPOCH + timedelta(minutes=15 * int(r() * slots)),
            _DURATIONS[int(r() * len(_DURATIONS))],
            _STATUSES[int(r() * len(_STATUSES))],
            _NOTES[int(r() * len(_NOTES))] if r() < 0.4 else None,
        )


def _prescriptions(seed: int, counts: dict[str, int]) -> Iterator[Row]:
    rng = _rng(seed, "prescriptions")
    r = rng.random
    n_appointments = counts["appointments"]
    for i in range(1, counts["prescriptions"] + 1):
        code, name, unit = _DRUGS[int(r() * len(_DRUGS))]
        if r() < 0.3:
            details = None
        else:
            sig = _SIGS[int(r() * len(_SIGS))]
            route = _ROUTES[int(r() * len(_ROUTES))]
            generic = "true" if r() < 0.8 else "false"
            details = (
                f'{{"drug": "{name}", "unit": "{unit}", "sig": "{sig}", "route": "{route}", '
                f'"generic_ok": {generic}}}'
            )
        yield (
            i,
            1 + int(r() * n_appointments),
            code,
            f"{0.125 * (1 + int(r() * 800)):.3f}",  # numeric(10,3) as exact text
            int(r() * 6),
            details,
            _RX_BASE + timedelta(days=int(r() * 730)),
        )


def _lab_results(seed: int, counts: dict[str, int]) -> Iterator[Row]:
    rng = _rng(seed, "lab_results")
    r = rng.random
    ids = _Ids(seed)
    n_patients = counts["patients"]
    for j in range(counts["lab_results"]):
        # Result j belongs to patient j % n and to "visit" j // n: the visit number makes
        # (patient_id, test_code, collected_at) unique whatever the random draws are.
        patient, visit = j % n_patients, j // n_patients
        code, unit, low, high = _LAB_TESTS[int(r() * len(_LAB_TESTS))]
        collected = EPOCH + timedelta(days=7 * visit, minutes=int(r() * 7 * 24 * 60 - 1))
        if r() < 0.1:
            value, flags = None, "{cancelled}"
        else:
            x = low + (high - low) * (r() * 1.6 - 0.3)
            value = f"{x:.2f}"
            flag = "H" if x > high else "L" if x < low else ""
            if r() < 0.02:
                flag = f"{flag},critical" if flag else "critical"
            flags = "{" + flag + "}"
        nbytes = int(r() * 24)
        raw = rng.getrandbits(8 * nbytes).to_bytes(nbytes, "little") if nbytes > 4 else None
        reference = None if r() < 0.2 else f"[{low},{high}]"
        yield (ids.patient(patient), code, collected, value, unit, flags, raw, reference)


def _vital_readings(seed: int, counts: dict[str, int]) -> Iterator[Row]:
    rng = _rng(seed, "vital_readings")
    r = rng.random
    gauss = rng.gauss
    ids = _Ids(seed)
    n_patients = counts["patients"]
    previous: Row | None = None
    for _ in range(counts["vital_readings"]):
        # Devices re-send: about 1% of rows are exact duplicates of the one before.
        if previous is not None and r() < 0.01:
            yield previous
            continue
        kind, mean, sd = _VITALS[int(r() * len(_VITALS))]
        value = None if r() < 0.03 else round(gauss(mean, sd), 1)
        previous = (
            ids.patient(int(r() * n_patients)),
            EPOCH + timedelta(seconds=int(r() * 63_072_000)),
            kind,
            value,
        )
        yield previous


_Generator = Callable[[int, dict[str, int]], Iterator[Row]]

# table -> (COPY column list, row generator); generated columns (patients.full_name) are
# never listed, and identity columns are given explicit ids (COPY accepts them even for
# GENERATED ALWAYS, like INSERT ... OVERRIDING SYSTEM VALUE).
_TABLES: dict[str, tuple[tuple[str, ...], _Generator]] = {
    "providers": (
        (
            "provider_id",
            "npi",
            "full_name",
            "specialty",
            "created_at",
        ),
        _providers,
    ),
    "patients": (
        (
            "patient_id",
            "mrn",
            "first_name",
            "last_name",
            "date_of_birth",
            "sex",
            "email",
            "phone",
            "address",
            "allergies",
            "created_at",
            "updated_at",
        ),
        _patients,
    ),
    "appointments": (
        (
            "appointment_id",
            "patient_id",
            "provider_id",
            "scheduled_at",
            "duration",
            "status",
            "notes",
        ),
        _appointments,
    ),
    "prescriptions": (
        (
            "prescription_id",
            "appointment_id",
            "drug_code",
            "dose",
            "refills",
            "details",
            "prescribed_on",
        ),
        _prescriptions,
    ),
    "lab_results": (
        (
            "patient_id",
            "test_code",
            "collected_at",
            "value",
            "unit",
            "flags",
            "raw",
            "reference_range",
        ),
        _lab_results,
    ),
    "vital_readings": (
        (
            "patient_id",
            "reading_at",
            "kind",
            "value",
        ),
        _vital_readings,
    ),
}

# Sequences behind the ids given explicitly above, moved past them afterwards.
_SEQUENCE_COLUMNS = (
    ("providers", "provider_id"),
    ("appointments", "appointment_id"),
    ("prescriptions", "prescription_id"),
)

SCHEMA = "public"


def _copy_table(
    conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Iterator[Row], batch: int
) -> int:
    """COPY ``rows`` into ``table``, committing every ``batch`` rows; returns the count."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(SCHEMA, table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    total = 0
    while True:
        chunk = itertools.islice(rows, batch)
        written = 0
        with conn.cursor() as cur, cur.copy(statement) as copy:
            write_row = copy.write_row
            for row in chunk:
                write_row(row)
                written += 1
        conn.commit()
        total += written
        if written < batch:
            return total


def generate(
    conninfo: str,
    rows: int,
    *,
    seed: int = 7,
    batch: int = 50_000,
    check_foreign_keys: bool = False,
) -> dict[str, int]:
    """Fill the example app's (empty) tables with about ``rows`` synthetic rows in total.

    Deterministic in (seed, rows): ``batch`` only sets how often to commit. Sequences are
    moved past the generated ids, so the application's next insert does not collide, and
    the tables are analyzed so their row estimates are realistic. Returns rows per table.

    The rows satisfy every foreign key by construction, so unless ``check_foreign_keys`` the
    load runs with ``session_replication_role = replica`` (as ``pg_restore
    --disable-triggers`` does) when the role may set it: the per-row FK triggers would
    otherwise halve the speed. Without the privilege the keys are simply checked.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    counts = plan_counts(rows)
    with psycopg.connect(conninfo) as conn:
        _empty_or_raise(conn)
        if not check_foreign_keys:
            try:
                conn.execute("SET session_replication_role = replica")
                conn.commit()
            except psycopg.errors.InsufficientPrivilege:
                conn.rollback()
        conn.execute("SET synchronous_commit = off")
        done: dict[str, int] = {}
        for table, (columns, make_rows) in _TABLES.items():
            done[table] = _copy_table(conn, table, columns, make_rows(seed, counts), batch)
        for table, column in _SEQUENCE_COLUMNS:
            conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({qualified}, {column}),"
                    " coalesce(max({ident}), 0) + 1, false) FROM {table}"
                ).format(
                    qualified=sql.Literal(f"{SCHEMA}.{table}"),
                    column=sql.Literal(column),
                    ident=sql.Identifier(column),
                    table=sql.Identifier(SCHEMA, table),
                )
            )
        conn.commit()
        conn.autocommit = True
        tables = sql.SQL(", ").join(sql.Identifier(SCHEMA, t) for t in _TABLES)
        conn.execute(sql.SQL("ANALYZE {}").format(tables))
    return done


def _empty_or_raise(conn: psycopg.Connection) -> None:
    """Refuse to add to existing rows: ids and uuids would collide with the earlier load."""
    for table in _TABLES:
        query = sql.SQL("SELECT EXISTS (SELECT FROM {})").format(sql.Identifier(SCHEMA, table))
        row = conn.execute(query).fetchone()
        if row is not None and row[0]:
            raise ValueError(f"{SCHEMA}.{table} already has rows; generate needs empty tables")
    conn.commit()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m supabase_migration.example_app.generate",
        description="Fill the example clinic app's tables with deterministic synthetic data.",
    )
    parser.add_argument("url", help="postgresql:// URL of a database at Alembic head")
    parser.add_argument("--rows", type=int, required=True, help="total rows, about")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=50_000, help="rows per COPY/commit")
    parser.add_argument(
        "--check-foreign-keys",
        action="store_true",
        help="keep the per-row foreign-key triggers on (slower; the data is consistent anyway)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    counts = generate(
        args.url,
        args.rows,
        seed=args.seed,
        batch=args.batch,
        check_foreign_keys=args.check_foreign_keys,
    )
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    for table, n in counts.items():
        print(f"{SCHEMA}.{table:<16} {n:>12,}")
    print(f"{total:,} rows in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
