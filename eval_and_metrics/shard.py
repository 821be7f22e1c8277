"""How an evaluation is shared between the ranks of a distributed run, seen from the scorers.

A scorer forms its batches exactly as one process would, polls `agree(stop)` before every batch (on
every rank, so all ranks stop at the same batch), computes only the batches it `owns`, and hands its
per-item (or per-request) values to `merge`, which returns every rank's values put together in one
process's order. Scores are then computed from the merged values in that order, so the numbers are the
same bit for bit however many ranks shared the work. training/distributed.World implements this for
several ranks; ONE is the single process.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

T = TypeVar("T")


class Shard(Protocol):
    @property
    def active(self) -> bool: ...

    def owns(self, index: int) -> bool: ...

    def agree(self, flag: bool) -> bool: ...

    def merge(self, values: list[T | None]) -> list[T]: ...


class _One:
    active = False

    def owns(self, index: int) -> bool:
        return True

    def agree(self, flag: bool) -> bool:
        return flag

    def merge(self, values: list[T | None]) -> list[T]:
        return values  # type: ignore[return-value]


ONE: Shard = _One()
