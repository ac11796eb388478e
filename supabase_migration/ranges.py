"""A key range: the unit of work, of checkpointing and of Dagster partitioning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

Bound = tuple[str, ...] | None
T = TypeVar("T")

# Ranges measured in one read snapshot: bounds how long a snapshot stays open on a busy source.
RANGES_PER_SNAPSHOT = 200


@dataclass(frozen=True)
class KeyRange:
    """One partition of one table: `lower <= key < upper` (None = open)."""

    table: str
    index: int
    lower: Bound
    upper: Bound

    @property
    def partition_key(self) -> str:
        return partition_key(self.index)

    def describe(self) -> str:
        low = "-inf" if self.lower is None else ",".join(self.lower)
        high = "+inf" if self.upper is None else ",".join(self.upper)
        return f"[{low}, {high})"


def partition_key(index: int) -> str:
    """Zero-padded so lexical order is key order in the UI."""
    return f"{index:06d}"


def whole_range(table: str) -> KeyRange:
    """The one range of a table read whole: a keyless table's plan, a whole-table checksum."""
    return KeyRange(table, 0, None, None)


def covers_key_space(ranges: Sequence[KeyRange]) -> bool:
    """Ranges open at both ends and contiguous: their counts (and checksums) add up to the
    table's."""
    ordered = sorted(ranges, key=lambda r: r.index)
    if not ordered or ordered[0].lower is not None or ordered[-1].upper is not None:
        return False
    return all(a.upper == b.lower for a, b in pairwise(ordered))


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
