"""The one exception type of the data package.

DataError subclasses ValueError so callers that already treat bad input as ValueError keep working;
main.py maps it to exit code 2. It holds one or more problems, each ONE line naming the file or field
and what would have been valid, because the CLI prints each as its own ``error:`` line. ``str()``
joins them with ``; `` for callers that show a single message.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataError(ValueError):
    """Bad benchmark input: a config field, a file, a record or a field of a record."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        # Values quoted from user files may carry newlines; keep the contract of one line per problem.
        self.problems = [" ".join(str(p).splitlines()) for p in items]
        super().__init__("; ".join(self.problems))
