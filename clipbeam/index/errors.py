"""The one exception the index package raises for bad inputs.

It is a UsageError, so the CLI prints it as one line and exits 2, and a
ValueError, so notebook users can catch it the way they catch numpy's errors.
"""

from clipbeam.errors import UsageError


class IndexInputError(UsageError, ValueError):
    """A query, an index folder or an embeddings input that cannot be used as given."""
