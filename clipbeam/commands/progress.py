"""Progress of a running job, read from the done-markers it writes.

Works the same for every runner: the submitting process polls the output's
`_parts/` folder (local or object storage) and prints parts done, samples/s
and failures. On a terminal the line is redrawn in place; otherwise a line is
logged every `log_every` seconds.
"""

from __future__ import annotations

import sys
import threading
import time

from clipbeam.layout.embeddings import MARKERS
from clipbeam.storage import join, list_names, read_json


class MarkerProgress:
    """A background thread that reports progress from `OUT/_parts/*.json` markers."""

    def __init__(self, output: str, total_parts: int, storage_options: dict | None, label: str = "embed",
                 interval: float = 1.0, log_every: float = 15.0, stream=None) -> None:
        self._dir = join(output, MARKERS)
        self._total = total_parts
        self._storage_options = storage_options
        self._label = label
        self._interval = interval
        self._log_every = log_every
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._seen: dict[str, dict] = {}
        self._start = time.monotonic()
        self._baseline: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="clipbeam-progress", daemon=True)

    def __enter__(self) -> "MarkerProgress":
        self._baseline = set(self._list())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self._emit(final=True)

    def _list(self) -> list[str]:
        try:
            return [name for name in list_names(self._dir, self._storage_options) if name.endswith(".json")]
        except OSError:
            return []

    def _poll(self) -> None:
        for name in self._list():
            if name in self._seen or name in self._baseline:
                continue
            try:
                self._seen[name] = read_json(join(self._dir, name), self._storage_options)
            except (OSError, ValueError):
                continue

    def _emit(self, final: bool = False) -> None:
        done = len(self._seen)
        samples = sum(m["samples"] for m in self._seen.values())
        failed = sum(m["failures"] for m in self._seen.values())
        seconds = max(time.monotonic() - self._start, 1e-9)
        line = (f"{self._label}: parts {done}/{self._total}  samples {samples}  "
                f"{samples / seconds:.1f} samples/s  failed {failed}  {seconds:.0f}s")
        if self._stream.isatty():
            self._stream.write("\r" + line + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def _run(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(self._interval):
            self._poll()
            now = time.monotonic()
            if self._stream.isatty() or now - last_log >= self._log_every:
                self._emit()
                last_log = now
