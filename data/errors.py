"""The one exception type of the data package.

DataError subclasses ValueError so callers that already treat bad input as ValueError keep working;
main.py maps it to exit code 2. Its message is always ONE line naming the file or field and what
would have been valid, because it is printed as-is on stderr.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad benchmark input: a config field, a file, a record or a field of a record."""

    def __init__(self, message: str) -> None:
        # Values quoted from user files may carry newlines; keep the contract of one line.
        super().__init__(" ".join(str(message).splitlines()))
