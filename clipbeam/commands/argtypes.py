"""The argparse types every command uses, and the map from library fields to flags.

One message style for every bad value: argparse reports a type's error as
`clipbeam CMD: error: argument --flag: must be at least 1, not 0` (one line,
exit 2). Library code raises clipbeam.errors.FieldError naming its field
(`shard_size`); `flag_message` names the flag instead (`--shard-size`).
"""

from __future__ import annotations

import argparse

from clipbeam.errors import FieldError


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, not {text!r}") \
            from None


def at_least(low: int):
    """An integer type: at least `low`."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    parse.__name__ = f"at_least_{low}"
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def unit_interval(text: str) -> float:
    """A float in (0, 1]: a recall, a fraction."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def port(text: str) -> int:
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, not {value}")
    return value


def flag_message(exc: Exception, flags: dict[str, str] | None = None) -> str:
    """An error's one line for the command line: a FieldError names the flag of its field
    (`flags`, else the field with dashes: rows_per_part -> --rows-per-part)."""
    if isinstance(exc, FieldError):
        return exc.naming(lambda field: (flags or {}).get(field) or "--" + field.replace("_", "-"))
    return str(exc)
