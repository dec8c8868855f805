"""Exceptions that the CLI turns into one line on stderr: UsageError and InputError (exit 2), LeaseLost (exit 1)."""

from __future__ import annotations

from typing import Callable


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (empty when it has none), cut to `limit` characters:
    for one-line errors that quote what a library said."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


class UsageError(Exception):
    """Bad arguments or inputs detected before any work starts (exit code 2)."""


class InputError(UsageError, ValueError):
    """An input (a query, an index folder, an embeddings input) that cannot be used as given: a
    UsageError for the CLI (one line, exit 2) and a ValueError for notebook users."""


class FieldError(InputError):
    """A bad value of a named field. The library writes the field's name where the template says
    `{field}` (`shard_size must be at least 1`), and other fields' names where it says `{name}` for a
    name in `others`; commands/ writes the flags there instead (`--shard-size must be at least 1`),
    so library errors carry no command-line words."""

    def __init__(self, field: str, template: str, others: tuple[str, ...] = ()) -> None:
        self.field = field
        self.template = template
        self.others = others
        super().__init__(self.naming(lambda name: name))

    def naming(self, name_of: Callable[[str], str]) -> str:
        """The message with every field called `name_of(field)`."""
        text = self.template.replace("{field}", name_of(self.field))
        for other in self.others:
            text = text.replace("{" + other + "}", name_of(other))
        return text


class LeaseLost(RuntimeError):
    """This run's lease was taken over; it must not commit anything more (layout/lease.py)."""
