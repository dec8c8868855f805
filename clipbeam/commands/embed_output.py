"""The state of an embed output folder: settings, done parts, stale files, manifest.

Resume works from files alone: a part is done when its marker
`_parts/part-NNNNN.json` exists and names the same source fingerprint; the
run's settings live in `_run.json` and must match for a rerun to resume.
`manifest.json` is written last and removed first, so its presence always
means "complete".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from clipbeam.errors import UsageError
from clipbeam.storage import get_fs, join, read_json, write_json
from clipbeam.transforms.corpus_plan import PartSpec
from clipbeam.transforms.parquet_sink import fragments_dir, marker_path, part_name

LOG = logging.getLogger(__name__)

# Settings that change the embeddings; a resumed run must use the same ones.
RESUME_KEYS = ("model", "pretrained", "weights", "seed", "precision", "dtype", "embed_text", "dim")


@dataclass
class EmbedOutput:
    url: str
    storage_options: dict | None

    def _fs(self):
        return get_fs(self.url, self.storage_options)

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def clear(self) -> None:
        """--overwrite: remove everything clipbeam wrote here (the folder stays)."""
        fs, root = self._fs()
        for name in ("manifest.json", "_run.json", "embeddings", "failures", "_parts", "_fragments"):
            target = join(root, name)
            if fs.exists(target):
                fs.rm(target, recursive=True)

    def prepare(self, settings: dict) -> None:
        """Check that a rerun uses the same settings, drop the manifest, record settings."""
        fs, root = self._fs()
        run_file = self.path("_run.json")
        if fs.exists(join(root, "_run.json")):
            previous = read_json(run_file, self.storage_options)
            changed = [k for k in RESUME_KEYS if previous.get(k) != settings.get(k)]
            if changed:
                details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise UsageError(f"{self.url} was written with other settings ({details}); "
                                 "use --overwrite to start over or another --output")
        manifest = join(root, "manifest.json")
        if fs.exists(manifest):
            fs.rm(manifest)
        write_json(run_file, settings, self.storage_options)

    def done_parts(self, parts: list[PartSpec]) -> dict[int, dict]:
        """Markers of the planned parts that are complete (same index, same fingerprint)."""
        fs, _ = self._fs()
        folder = self.path("_parts")
        _, folder_path = get_fs(folder, self.storage_options)
        try:
            fs.invalidate_cache(folder_path)
            present = set(fs.ls(folder_path, detail=False))
        except FileNotFoundError:
            return {}
        done = {}
        for index, spec in enumerate(parts):
            _, path = get_fs(marker_path(self.url, index), self.storage_options)
            if path not in present:
                continue
            try:
                with fs.open(path, "rb") as handle:
                    marker = json.loads(handle.read())
            except (OSError, ValueError):
                continue
            if marker.get("fingerprint") != spec.fingerprint:
                continue
            files = [marker.get(k) for k in ("embeddings", "failures_file") if marker.get(k)]
            if all(fs.exists(get_fs(self.path(f), self.storage_options)[1]) for f in files):
                done[index] = marker  # a part whose file was deleted is redone
        return done

    def forget(self, indexes: list[int]) -> None:
        """Remove the markers and row fragments of parts that will be redone (stale or partial)."""
        fs, _ = self._fs()
        for index in indexes:
            for url in (marker_path(self.url, index), fragments_dir(self.url, index)):
                _, path = get_fs(url, self.storage_options)
                if fs.exists(path):
                    fs.rm(path, recursive=True)

    def remove_stale(self, markers: dict[int, dict]) -> list[str]:
        """Delete part files that no complete part claims (left by an earlier plan)."""
        fs, root = self._fs()
        keep = set()
        for marker in markers.values():
            for key in ("embeddings", "failures_file"):
                if marker.get(key):
                    keep.add(marker[key])
        removed = []
        for folder in ("embeddings", "failures"):
            target = join(root, folder)
            if not fs.exists(target):
                continue
            for path in fs.ls(target, detail=False):
                name = path.rsplit("/", 1)[-1]
                stale = name.startswith("part-") and f"{folder}/{name}" not in keep
                if stale or (name.startswith(".") and ".tmp-" in name):  # left by a killed run
                    fs.rm(path)
                    removed.append(f"{folder}/{name}")
        planned = {get_fs(marker_path(self.url, index), self.storage_options)[1] for index in markers}
        fs.invalidate_cache(join(root, "_parts"))
        for path in fs.ls(join(root, "_parts"), detail=False):
            if path not in planned:  # markers of parts an earlier, larger plan had
                fs.rm(path)
        fragments = join(root, "_fragments")
        if fs.exists(fragments):  # left by parts of a killed run that are no longer planned
            fs.rm(fragments, recursive=True)
        if removed:
            LOG.info("removed %d part files left by an earlier run: %s", len(removed), ", ".join(removed[:5]))
        return removed

    def write_manifest(self, settings: dict, parts: list[PartSpec], markers: dict[int, dict],
                       seconds: float) -> dict:
        entries = []
        for index, spec in enumerate(parts):
            marker = markers[index]
            entries.append({
                "part": index,
                "name": part_name(index),
                "source": spec.source,
                "samples": marker["samples"],
                "rows": marker["rows"],
                "text_rows": marker.get("text_rows", 0),
                "failures": marker["failures"],
                "failed_by_stage": marker["failed_by_stage"],
                "path": marker["embeddings"],
                "failures_path": marker["failures_file"],
            })
        failed_by_stage: dict[str, int] = {}
        for entry in entries:
            for stage, count in entry["failed_by_stage"].items():
                failed_by_stage[stage] = failed_by_stage.get(stage, 0) + count
        manifest = dict(settings)
        manifest.update({
            "format": "clipbeam.embeddings",
            "format_version": 2,  # 2: source_offset / source_size columns
            "samples": sum(e["samples"] for e in entries),
            "rows": sum(e["rows"] for e in entries),
            "failures": sum(e["failures"] for e in entries),
            "failed_by_stage": failed_by_stage,
            "seconds_last_run": round(seconds, 3),
            "parts": entries,
        })
        write_json(self.path("manifest.json"), manifest, self.storage_options)
        return manifest
