"""`migration.yaml`: the reviewable description of what will be migrated.

`supabase-migrate init` writes it from the source catalog; Dagster definitions are built from it,
so `dagster dev` loads with the source offline. It never holds a URL or a password.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .catalog import TableInfo
from .errors import ConfigError, listed, read_user_text
from .planning import DEFAULT_BATCH_SIZE

MANIFEST_ENV = "SUPABASE_MIGRATION_MANIFEST"
# The largest count a flag or the manifest may give (rows per range, sample size): an int4,
# as PostgreSQL takes it, and past any sensible range.
LARGEST_COUNT = 2_147_483_647
DEFAULT_MANIFEST = "migration.yaml"
SCHEMA_MODES = ("alembic", "dump", "none")
MANIFEST_VERSION = 1

_HEADER = """\
# supabase-migration manifest: what `supabase-migrate run` and the Dagster assets migrate.
# Written by `supabase-migrate init` from the source catalog. Review it, edit batch sizes or
# the include/exclude filters, and commit it. It holds no URLs or passwords: those come from
# SOURCE_DATABASE_URL and SUPABASE_DB_URL.
"""


@dataclass(frozen=True)
class ManifestTable:
    name: str  # schema.table
    key: tuple[str, ...]
    key_source: str
    estimated_rows: int | None = None
    batch_size: int | None = None
    parents: tuple[str, ...] = ()
    partitioned: bool = False

    @property
    def schema(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def table(self) -> str:
        return self.name.split(".", 1)[1]


def beside(manifest_path: Path, relative: str) -> Path:
    """A path the manifest holds, relative to its directory unless absolute."""
    path = Path(relative).expanduser()
    return path if path.is_absolute() else manifest_path.parent / path


@dataclass(frozen=True)
class Manifest:
    tables: tuple[ManifestTable, ...]
    schemas: tuple[str, ...] = ("public",)
    schema_mode: str = "dump"
    alembic_config: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exposed_schemas: tuple[str, ...] = ("public",)
    # `init` was given no schemas: every schema of the source, a schema it gains later too
    every_schema: bool = False
    path: Path | None = field(default=None, compare=False)

    @property
    def alembic_config_path(self) -> Path | None:
        """alembic_config, a relative one taken from the manifest's directory: the commands
        run from anywhere (cron, CI, the Dagster UI's code server)."""
        if not self.alembic_config:
            return None
        if self.path is None:
            return Path(self.alembic_config).expanduser()
        return beside(self.path, self.alembic_config)

    def table(self, name: str) -> ManifestTable:
        for t in self.tables:
            if t.name == name:
                return t
        raise ConfigError(
            f"Table {name} is not in the manifest; run `supabase-migrate init` again."
        )

    def left_out(self, source_tables: Iterable[str]) -> list[str]:
        """Those of `source_tables` (the manifest's schemas') that its filters select but it
        does not list: tables made after `init`, which nothing would migrate."""
        known = {t.name for t in self.tables}
        return [
            name
            for name in source_tables
            if name not in known and selected(name, self.include, self.exclude)
        ]

    def left_out_sentence(self, names: Sequence[str]) -> str:
        """What to say of tables `left_out` found: that nothing migrates them, and the way out
        (an `init` of the same schemas keeps the filters, batch sizes and settings)."""
        where = self.path or default_path()
        command = ["supabase-migrate", "init"]
        if not self.every_schema:
            command += ["--schemas", ",".join(self.schemas)]
        if where != default_path():
            command += ["--manifest", str(where)]
        one = len(names) == 1
        them = "it" if one else "them"
        return (
            f"The source has {'a table' if one else f'{len(names)} tables'} that {where} does "
            f"not list ({listed(names, 5)}), so nothing migrates {them}; run "
            f"`{shlex.join(command)}` again to add {them}, or edit the manifest's exclude "
            f"filters to leave {them} out."
        )

    def removed_sentence(self, names: Sequence[str]) -> str:
        """What to say of tables `left_out` found that earlier runs copied: the user took them
        out of the manifest (not a table the source gained since)."""
        where = self.path or default_path()
        one = len(names) == 1
        return (
            f"{listed(names, 5)} {'is' if one else 'are'} no longer in {where}, though earlier "
            f"runs copied {'it' if one else 'them'}: those rows stay on the target, no longer "
            "synced nor verified; add the manifest's exclude filters to say so, or run "
            "`supabase-migrate init` again to migrate "
            f"{'it' if one else 'them'}."
        )

    def batch_size_for(self, table: ManifestTable) -> int:
        return table.batch_size or self.batch_size

    def with_settings(self, **changes: object) -> Manifest:
        return replace(self, **changes)  # type: ignore[arg-type]


def selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Glob filters on schema.table (`public.*`, `*.audit_log`); exclude wins."""
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def is_pattern(text: str) -> bool:
    """Whether a filter is a glob (`public.*`) rather than one table's name."""
    return any(c in text for c in "*?[")


def matching(pattern: str, names: Sequence[str]) -> bool:
    """Whether the filter `pattern` matches any of `names` (schema.table)."""
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


def from_catalog(
    tables: Sequence[TableInfo],
    *,
    schemas: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    batch_sizes: Mapping[str, int] | None = None,
    **settings: object,
) -> Manifest:
    """The manifest of `tables` left by the filters; `batch_sizes` are per-table overrides
    kept from the manifest this one replaces."""
    batch_sizes = batch_sizes or {}
    chosen = [t for t in tables if selected(t.qualified_name, include, exclude)]
    names = {t.qualified_name for t in chosen}
    entries = tuple(
        ManifestTable(
            name=t.qualified_name,
            key=t.key,
            key_source=t.key_source,
            estimated_rows=t.estimated_rows,
            batch_size=batch_sizes.get(t.qualified_name),
            parents=tuple(p for p in t.parents if p in names),
            partitioned=t.partitioned,
        )
        for t in chosen
    )
    return Manifest(
        tables=entries,
        schemas=tuple(schemas),
        include=tuple(include),
        exclude=tuple(exclude),
        **settings,  # type: ignore[arg-type]
    )


# The stand-in the definitions are built from when there is no manifest to read: its
# assets refuse to run (see assets.setup_asset).
NO_MANIFEST = Manifest(tables=())


def default_path() -> Path:
    return Path(os.environ.get(MANIFEST_ENV) or DEFAULT_MANIFEST)


def write(manifest: Manifest, path: Path) -> None:
    doc = {
        "version": MANIFEST_VERSION,
        "schemas": list(manifest.schemas),
        **({"every_schema": True} if manifest.every_schema else {}),
        "schema_mode": manifest.schema_mode,
        "alembic_config": manifest.alembic_config,
        "batch_size": manifest.batch_size,
        "include": list(manifest.include),
        "exclude": list(manifest.exclude),
        "exposed_schemas": list(manifest.exposed_schemas),
        "tables": {
            t.name: {
                "key": list(t.key),
                "key_source": t.key_source,
                "estimated_rows": t.estimated_rows,
                **({"batch_size": t.batch_size} if t.batch_size else {}),
                "parents": list(t.parents),
                **({"partitioned": True} if t.partitioned else {}),
            }
            for t in manifest.tables
        },
    }
    _replace(path, _HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private temp name per writer: two runs rewriting the manifest never share a file.
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
    ) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def text_if_present(path: Path) -> str | None:
    """The manifest's text as it is now (to `put_back`), None when there is none or it
    cannot be read (the command then says so itself)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def put_back(path: Path, text: str | None) -> bool:
    """The manifest as `text_if_present` read it, if it has changed since; whether it had."""
    if text is None or text_if_present(path) == text:
        return False
    _replace(path, text)
    return True


class OtherManifestVersion(ConfigError):
    """A manifest another release wrote: `init` writes it anew, other commands refuse it."""


def read(path: Path) -> Manifest:
    missing = f"No manifest at {path}; run `supabase-migrate init` to write one from the source."
    text = read_user_text(path, "The manifest", missing)
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except _TwiceGiven as exc:
        raise ConfigError(f"The manifest {path} {exc}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # where, never the text there
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"The manifest {path} is not valid YAML ({exc.__class__.__name__}{where})."
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise ConfigError(
            f"The manifest {path} has no `tables` mapping; run `supabase-migrate init`."
        )
    unqualified = [str(name) for name in doc["tables"] if "." not in str(name)]
    if unqualified:
        raise ConfigError(
            f"The manifest {path} names tables without their schema ({', '.join(unqualified)}); "
            "write them as schema.table, e.g. public.patients."
        )
    mode = doc.get("schema_mode", "dump")
    if mode not in SCHEMA_MODES:
        raise ConfigError(f"The manifest's schema_mode must be one of {', '.join(SCHEMA_MODES)}.")
    version = doc.get("version", MANIFEST_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"The manifest {path}: version must be the number {MANIFEST_VERSION}.")
    if version != MANIFEST_VERSION:
        raise OtherManifestVersion(
            f"The manifest {path} is version {doc['version']}, and this release reads version "
            f"{MANIFEST_VERSION}; run `supabase-migrate init` to write it again."
        )
    _refuse_unknown_keys(path, doc)  # after the version: another release may know more
    fields = _Fields(path)
    tables = []
    for name, spec in doc["tables"].items():
        spec = fields.mapping(name, spec)
        tables.append(
            ManifestTable(
                name=str(name),
                key=fields.names(spec, "key", (), name),
                key_source=str(spec.get("key_source", "none")),
                estimated_rows=fields.count(spec, "estimated_rows", name, positive=False),
                batch_size=fields.count(spec, "batch_size", name),
                parents=fields.names(spec, "parents", (), name),
                partitioned=spec.get("partitioned", False) is True,
            )
        )
    alembic_config = doc.get("alembic_config")
    if alembic_config is not None and not isinstance(alembic_config, str):
        raise ConfigError(f"The manifest {path}: alembic_config must be a path to an alembic.ini.")
    schemas = fields.names(doc, "schemas", ("public",))
    outside = [t.name for t in tables if t.schema not in schemas]
    if outside:  # the schema step makes only the schemas' tables: its copy would fail late
        raise ConfigError(
            f"The manifest {path} lists {', '.join(outside[:3])}"
            f"{' and more' if len(outside) > 3 else ''} outside its schemas "
            f"({', '.join(schemas)}); add the schema to `schemas` (or run `supabase-migrate "
            "init --schemas ...`), or remove the table."
        )
    return Manifest(
        tables=tuple(tables),
        schemas=schemas,
        schema_mode=mode,
        alembic_config=alembic_config,
        batch_size=fields.count(doc, "batch_size") or DEFAULT_BATCH_SIZE,
        include=fields.names(doc, "include", ()),
        exclude=fields.names(doc, "exclude", ()),
        exposed_schemas=fields.names(doc, "exposed_schemas", ("public",)),
        every_schema=doc.get("every_schema", False) is True,
        path=path,
    )


_KEYS = {
    "version",
    "schemas",
    "every_schema",
    "schema_mode",
    "alembic_config",
    "batch_size",
    "include",
    "exclude",
    "exposed_schemas",
    "tables",
}
_TABLE_KEYS = {"key", "key_source", "estimated_rows", "batch_size", "parents", "partitioned"}


def _refuse_unknown_keys(path: Path, doc: dict[object, object]) -> None:
    """A misspelt key (`exlude:`, `btach_size:`) was ignored without a word."""
    tables = doc["tables"]
    assert isinstance(tables, dict)
    unknown = [str(k) for k in doc if k not in _KEYS] + [
        f"{name}: {k}"
        for name, spec in tables.items()
        if isinstance(spec, dict)
        for k in spec
        if k not in _TABLE_KEYS
    ]
    if unknown:
        raise ConfigError(
            f"The manifest {path} has a key this release does not know ({', '.join(unknown)}); "
            "fix its spelling or remove it."
        )


class _TwiceGiven(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: a second `tables:` block
    replaced the first, and a table listed twice lost its first entry's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                line = key_node.start_mark.line + 1
                raise _TwiceGiven(f"names {key_node.value} twice (line {line})")
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class _Fields:
    """Reads a manifest's fields, each of the type it must have, or one sentence naming it.

    A list written as one string (`exposed_schemas: public`) must not be read as its letters:
    the schemas given row level security would then be none."""

    path: Path

    def _refuse(self, what: str, table: str | None, must: str) -> ConfigError:
        where = f"{table}'s {what}" if table else what
        return ConfigError(f"The manifest {self.path}: {where} must be {must}.")

    def mapping(self, table: str, spec: object) -> dict[str, object]:
        if not isinstance(spec, dict):
            raise self._refuse("entry", table, "a mapping, like `{key: [id]}`")
        return spec

    def names(
        self, doc: dict, what: str, default: tuple[str, ...], table: str | None = None
    ) -> tuple[str, ...]:
        value = doc.get(what)
        if value is None or value == []:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._refuse(what, table, "a list of names, one `- name` a line or `[a, b]`")
        return tuple(value)

    def count(
        self, doc: dict, what: str, table: str | None = None, *, positive: bool = True
    ) -> int | None:
        """A whole number: a size (`positive`, at most LARGEST_COUNT), or an estimate."""
        value = doc.get(what)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._refuse(what, table, "a whole number")
        if positive and not 1 <= value <= LARGEST_COUNT:
            raise self._refuse(what, table, f"a whole number from 1 to {LARGEST_COUNT:,}")
        return value


def read_if_present(path: Path | None = None) -> Manifest | None:
    path = path or default_path()
    return read(path) if path.exists() else None
