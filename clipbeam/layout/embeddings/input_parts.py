"""Which embeddings parts a classify or export run works on, and the numbers their outputs get.

An output part is named after the embeddings part it came from
(`embeddings/part-00007.parquet` -> `labels/part-00007.parquet`), not after
its position in the list: embed keeps a source's part number when the corpus
grows, so the outputs of earlier runs keep their names and a rerun finds them
done. Plain Parquet inputs (no embed manifest) are numbered in sorted order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clipbeam.layout.embeddings.read import EmbeddingsInput, InputFile

_PART_NAME = re.compile(r"part-(\d+)\.parquet$")


@dataclass(frozen=True)
class EmbeddingsPart:
    """One embeddings part to process, with the number its outputs are named by."""

    number: int
    file: InputFile


def embeddings_parts(inputs: EmbeddingsInput) -> list[EmbeddingsPart]:
    """The non-empty parts of an input, numbered by their embed part name where there is one."""
    numbers = [_PART_NAME.search(f.url) for f in inputs.files]
    if inputs.manifest is None or not all(numbers):
        return [EmbeddingsPart(i, f) for i, f in enumerate(inputs.files)]
    return [EmbeddingsPart(int(m.group(1)), f) for m, f in zip(numbers, inputs.files, strict=True)]
