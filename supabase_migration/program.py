"""The `supabase-migrate` executable's entry point.

Light on purpose: Python spends about a second importing the tool (psycopg, Dagster for
most commands) before `cli.main` can catch anything, and Ctrl-C in that second printed a
traceback through whichever import it interrupted.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import console_main
    except KeyboardInterrupt:
        print("Interrupted before the command started; nothing was done.", file=sys.stderr)
        return 1
    return console_main()


if __name__ == "__main__":
    sys.exit(main())
