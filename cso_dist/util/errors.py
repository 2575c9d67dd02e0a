"""User-facing errors: one line naming the file, the record and the field."""

from __future__ import annotations


class CsoError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero."""


class ConfigError(CsoError):
    """An invalid configuration key or value."""


class DataError(CsoError):
    """A bad record in an input file.

    `record` is human readable: "line 12" for JSONL, "record 3" for JSON arrays.
    `field` is a path inside the record such as "messages[3].strategy".
    `reason` is a short machine-friendly category used when counting skipped records.
    """

    def __init__(self, path: str, record: str | None, field: str | None, message: str, reason: str = "invalid"):
        self.path, self.record, self.field, self.message, self.reason = path, record, field, message, reason
        parts = [str(path)]
        if record:
            parts.append(record)
        if field:
            parts.append(field)
        super().__init__(": ".join(parts + [message]))
