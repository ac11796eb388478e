"""A key range: the unit of work, of checkpointing and of Dagster partitioning."""

from __future__ import annotations

from dataclasses import dataclass

Bound = tuple[str, ...] | None


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
