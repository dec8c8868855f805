"""The folder format of `clipbeam generate`: names, the two Parquet tables and their schemas.

    OUT/images/<row id>.png            the render (PNG text chunks: prompt, seed, settings, models)
    OUT/renders/<row id>.json          its done-marker: the table row, settings hash, loss history, files
    OUT/frames/<row id>/step-SSSSS.png with --save-every N
    OUT/animations/<row id>.gif|.png   with --save-every N
    OUT/renders.parquet                one row per finished render
    OUT/failures.parquet               one row per failed render (only when there are some)
    OUT/manifest.json                  written last

A row id is `NNNNN-<slug>-s<seed>`: the prompt's row in the prompts file, a
slug of its text, and the seed. Markers live in `renders/`, the folder name
this format has always used, so outputs of earlier versions keep their layout.
"""

from __future__ import annotations

from clipbeam.layout.folder import OutputKind
from clipbeam.storage import atomic_open, remove_if_present

IMAGES, MARKERS, FRAMES, ANIMATIONS = "images", "renders", "frames", "animations"
RENDERS_TABLE, FAILURES_TABLE = "renders.parquet", "failures.parquet"
FORMAT_VERSION = 1

RENDERS = OutputKind("clipbeam.generate", markers=MARKERS)

RENDER_COLUMNS = ("id", "prompt", "seed", "steps", "width", "height", "loss_initial", "loss_final",
                  "clip_similarity", "path", "animation", "seconds")


def image_name(row_id: str) -> str:
    return f"{IMAGES}/{row_id}.png"


def animation_name(row_id: str, kind: str) -> str:
    return f"{ANIMATIONS}/{row_id}.{'gif' if kind == 'gif' else 'png'}"


def frame_name(row_id: str, step: int) -> str:
    return f"{FRAMES}/{row_id}/step-{step:05d}.png"


def renders_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("steps", pa.int32()),
        ("width", pa.int32()), ("height", pa.int32()), ("loss_initial", pa.float64()),
        ("loss_final", pa.float64()), ("clip_similarity", pa.float64()), ("path", pa.string()),
        ("animation", pa.string()), ("seconds", pa.float64()),
    ])


def failures_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("stage", pa.string()),
                      ("error", pa.string())])


def write_table(rows: list[dict], schema, url: str, storage_options: dict | None) -> int:
    """Write rows (sorted by id) as one Parquet file, atomically; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["id"])
    table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows], schema=schema)
    with atomic_open(url, "wb", storage_options) as handle:
        pq.write_table(table, handle)
    return len(rows)


def write_renders(rows: list[dict], url: str, storage_options: dict | None) -> int:
    return write_table(rows, renders_schema(), url, storage_options)


def write_failures(rows: list[dict], url: str, storage_options: dict | None) -> int:
    """failures.parquet when there are failures; a stale one from an earlier run is removed."""
    if rows:
        return write_table(rows, failures_schema(), url, storage_options)
    remove_if_present(url, storage_options)
    return 0
