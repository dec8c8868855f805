"""Exceptions that the CLI turns into one line on stderr: UsageError (exit 2), LeaseLost (exit 1)."""


class UsageError(Exception):
    """Bad arguments or inputs detected before any work starts (exit code 2)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over; it must not commit anything more (layout/lease.py)."""
