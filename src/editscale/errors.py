"""Exceptions that the CLI turns into one clear line instead of a traceback."""

from __future__ import annotations


class EditscaleError(Exception):
    """Base class: a user-facing error whose message says what is wrong and where."""


class RecordError(EditscaleError, ValueError):
    """A data record is malformed; the message names the record (index, case_id) and the field."""

    def __init__(self, message: str, *, index: int | None = None, case_id: object = None,
                 field: str | None = None, source: str | None = None) -> None:
        where = []
        if source:
            where.append(source)
        if index is not None:
            where.append(f"record #{index}")
        if case_id is not None:
            where.append(f"case_id={case_id}")
        if field:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.detail = message  # the message without the location prefix
        self.index = index
        self.case_id = case_id
        self.field = field
        self.source = source


class UnknownNameError(EditscaleError, KeyError):
    """An unknown model family, preset, dataset, task or method name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""
