"""Planning renders for `clipbeam generate`: prompt tables in, one RenderJob per (prompt row, seed) out.

Pure functions apart from reading the prompts file: which renders a run
holds, at which size, and the settings hash that says whether a finished
render can be reused. Unit-tested on their own, like corpus planning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from clipbeam.errors import FieldError, UsageError, first_line
from clipbeam.models.prompts import parse_prompts
from clipbeam.models.vqgan_clip import output_size
from clipbeam.storage import decode_utf8, open_input, require_readable_file

TABLE_SUFFIXES = (".parquet", ".csv", ".txt")


@dataclass(frozen=True)
class RenderJob:
    """One Beam element: a (prompt, seed) render with everything it needs to be redone identically."""

    index: int  # the prompt's row in the prompts file
    ordinal: int  # 1-based position among the run's renders (for progress lines)
    total: int
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    requested: tuple[int, int]
    init_image: str | None
    row_id: str  # NNNNN-<slug>-s<seed>: the id in renders.parquet and the name of its files
    settings_hash: str  # everything that shapes the pixels; a finished render is reused only when it matches


@dataclass(frozen=True)
class PromptRow:
    """One row of the prompts file; None means "use the command-line value"."""

    prompt: str
    seed: int | None = None
    steps: int | None = None
    size: tuple[int, int] | None = None
    init_image: str | None = None


def slugify(text: str, limit: int = 48) -> str:
    """A file-name-safe, lowercase ASCII slug of a prompt ("prompt" when nothing is left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if len(slug) > limit:
        slug = slug[:limit].rsplit("-", 1)[0] if "-" in slug[:limit] else slug[:limit]
    return slug or "prompt"


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (duplicates dropped, order kept)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"-?\d+", part):
            raise FieldError("seeds", f"{{field}} must be comma-separated integers, not {text!r}")
        if int(part) not in seeds:
            seeds.append(int(part))
    return seeds


def parse_size(value: Any) -> tuple[int, int]:
    """'256x128', '256 128' or (256, 128) -> (256, 128)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    match = re.fullmatch(r"\s*(\d+)\s*[x× ,]\s*(\d+)\s*", str(value))
    if not match:
        raise ValueError(f"size {value!r} is not WxH")
    return int(match.group(1)), int(match.group(2))


def _resolve_relative(path: str, base: str) -> str:
    if "://" in path or path.startswith("/") or "/" not in base:
        return path
    return base.rsplit("/", 1)[0] + "/" + path


def _read_bytes(url: str, storage_options: dict | None) -> bytes:
    lower = url.lower()
    if not lower.endswith(TABLE_SUFFIXES):
        raise FieldError("prompts", f"{{field}} must be a .txt, .csv or .parquet file, not {url}")
    require_readable_file(url, storage_options, what="prompts file")
    with open_input(url, storage_options) as handle:
        return handle.read()


def _read_table(data: bytes, url: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if url.lower().endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={"prompt": "string", "size": "string", "init_image": "string"}))
        return pq.read_table(io.BytesIO(data))
    except Exception as exc:
        raise UsageError(f"cannot read prompts table {url}: {first_line(exc)}") from None


def _table_row(record: dict, url: str) -> PromptRow:
    prompt = record["prompt"]
    if prompt is None or not str(prompt).strip():
        raise ValueError("empty prompt")
    init = record.get("init_image") or None
    return PromptRow(str(prompt).strip(), _optional_int(record.get("seed"), "seed"),
                     _optional_int(record.get("steps"), "steps"),
                     parse_size(record["size"]) if record.get("size") not in (None, "") else None,
                     _resolve_relative(str(init), url) if init else None)


def read_prompt_rows(url: str, storage_options: dict | None = None) -> list[PromptRow]:
    """Read a prompts file; raises UsageError naming the row for anything malformed.

    .txt: one prompt a line, blank lines and lines starting with '#' skipped.
    .csv/.parquet: a `prompt` column and optional `seed`, `steps`, `size`, `init_image`
    (init images relative to the prompts file).
    """
    data = _read_bytes(url, storage_options)
    if url.lower().endswith(".txt"):
        lines = decode_utf8(data, url, field="prompts").splitlines()
        return [PromptRow(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    table = _read_table(data, url)
    if "prompt" not in table.column_names:
        raise UsageError(f"prompts table {url} has no 'prompt' column (columns: {', '.join(table.column_names)})")
    rows = []
    for number, record in enumerate(table.to_pylist(), start=1):
        try:
            rows.append(_table_row(record, url))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"prompts table {url}, row {number}: {exc}") from None
    return rows


def _optional_int(value: Any, name: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} {value!r} is not an integer")
    return int(value)


def _row_jobs(index: int, row: PromptRow, seeds: list[int], steps: int, size: tuple[int, int], factor: int,
              fingerprint: str) -> list[RenderJob]:
    """The renders of one prompt row (ordinal and total are filled in by plan_renders)."""
    try:
        parse_prompts(row.prompt)
    except ValueError as exc:
        raise UsageError(f"prompt {index}: {exc}") from None
    row_steps = row.steps if row.steps is not None else steps
    if row_steps < 1:
        raise UsageError(f"prompt {index}: steps must be at least 1")
    requested = tuple(row.size or size)
    try:
        width, height = output_size(requested[0], requested[1], factor)
    except ValueError as exc:
        raise UsageError(f"prompt {index}: {exc}") from None
    jobs = []
    for seed in ([row.seed] if row.seed is not None else seeds):
        identity = json.dumps([row.prompt, seed, row_steps, width, height, row.init_image, fingerprint])
        jobs.append(RenderJob(
            index=index, ordinal=0, total=0, prompt=row.prompt, seed=seed, steps=row_steps, width=width,
            height=height, requested=requested, init_image=row.init_image,
            row_id=f"{index:05d}-{slugify(row.prompt)}-s{seed}",
            settings_hash=hashlib.sha256(identity.encode()).hexdigest()[:32]))
    return jobs


def plan_renders(rows: list[PromptRow], seeds: list[int], steps: int, size: tuple[int, int], factor: int,
                 fingerprint: str) -> list[RenderJob]:
    """Expand prompt rows x seeds into jobs (pure: no I/O). Raises UsageError for bad steps or sizes."""
    jobs = [job for index, row in enumerate(rows)
            for job in _row_jobs(index, row, seeds, steps, size, factor, fingerprint)]
    return [dataclasses.replace(job, ordinal=n, total=len(jobs)) for n, job in enumerate(jobs, start=1)]
