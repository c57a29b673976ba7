"""The one user-facing error type.

Every failure a user can cause (a bad recipe, a broken model file, a full disk) is raised as a
:class:`GGMergeError` carrying the file and, where known, the tensor or recipe key. The CLI prints it
as one line and exits non-zero; tracebacks are shown only with ``--debug``.
"""
from __future__ import annotations

import os
from pathlib import Path


class GGMergeError(Exception):
    """An error a user can act on: *where* (file, tensor/key) and *what*."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        tensor: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        self.key = key
        self.line = line
        #: further problems reported together with this one (see :func:`raise_all`)
        self.others: list[GGMergeError] = []

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"{self.path}:{self.line}" if self.line else str(self.path))
        if self.key is not None:
            where.append(f"key '{self.key}'")
        if self.tensor is not None:
            where.append(f"tensor '{self.tensor}'")
        return (": ".join(where) + ": " if where else "") + self.message


def did_you_mean(word: str, choices) -> str:
    """A ' (did you mean 'x'?)' suffix for an unknown name, or ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def raise_all(problems: list[GGMergeError], log=None) -> None:
    """Raise the first of ``problems`` (if any) with the others logged one line each before it, so a
    user fixes every range or key mistake of a recipe in one go while the error itself stays one
    line. The others travel as ``.others`` for callers that want them."""
    if not problems:
        return
    import logging

    log = log or logging.getLogger(__name__)
    first, rest = problems[0], problems[1:]
    for p in rest:
        log.error("%s", p)
    if rest:
        first = GGMergeError(f"{first.message} (and {len(rest)} more problem(s), listed above)",
                             path=first.path, tensor=first.tensor, key=first.key, line=first.line)
    first.others = list(rest)
    raise first from None  # called while handling the last problem: its traceback is this one's
