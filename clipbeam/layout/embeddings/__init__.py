"""The embeddings format (what `clipbeam embed` writes), owned here and nowhere else.

Modules: `parts` (folder names, part numbers by source, the manifest),
`write` (the Arrow schema and the Parquet writers), `read` (finding and
streaming vectors), `input_parts` (which parts a classify or export run
works on). The folder names are re-exported here.
"""

from clipbeam.layout.embeddings.parts import (
    EMBEDDINGS,
    FORMAT_VERSION,
    FRAGMENTS,
    MARKERS,
    NUMBERS_NOTE,
    PartPlan,
    build_manifest,
    embeddings_file,
    failures_file,
    fragments_dir,
    fragments_name,
    known_numbers,
    manifest_entry,
    manifest_files,
    number_sources,
    part_name,
    plan_numbers,
)

__all__ = [
    "EMBEDDINGS", "FORMAT_VERSION", "FRAGMENTS", "MARKERS", "NUMBERS_NOTE", "PartPlan", "build_manifest",
    "embeddings_file", "failures_file", "fragments_dir", "fragments_name", "known_numbers", "manifest_entry",
    "manifest_files", "number_sources", "part_name", "plan_numbers",
]
