"""Exceptions that the CLI turns into one line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad arguments or inputs detected before any work starts (exit code 2)."""
