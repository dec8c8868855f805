"""The exception the index package raises for bad inputs: clipbeam.errors.InputError, under the name
the index package has always used (the embeddings reader, clipbeam.layout.embeddings.read, raises it too)."""

from clipbeam.errors import InputError

IndexInputError = InputError
