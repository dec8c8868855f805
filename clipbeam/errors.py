"""Exceptions that the CLI turns into one line on stderr: UsageError and InputError (exit 2), LeaseLost (exit 1)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (empty when it has none), cut to `limit` characters:
    for one-line errors that quote what a library said."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


class UsageError(Exception):
    """Bad arguments or inputs detected before any work starts (exit code 2)."""


class InputError(UsageError, ValueError):
    """An input (a query, an index folder, an embeddings input) that cannot be used as given: a
    UsageError for the CLI (one line, exit 2) and a ValueError for notebook users."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over; it must not commit anything more (layout/lease.py)."""
