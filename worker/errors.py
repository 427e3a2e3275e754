"""Error helpers shared by every module."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for logs and error messages."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
