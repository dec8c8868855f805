"""The Beam job of `clipbeam dedup`: exact groups by hash, near-duplicate links by cluster, groups, parts.

    parts --ReadHashes--> (sha256, row) --GroupByKey--> exact forests ---------------\
    parts --Route-------> (unit, block rows) --GroupByKey--> Links (cached) --> forests --> Components (one
                                                             \--> nearest-neighbour histogram       value)
    parts --Members(side input: components)--> (lowest-threshold group, member) --GroupByKey--> rows
          --by part--> groups/part-NNNNN.parquet + done-marker

The vectors do not travel through the shuffle: Route writes each batch's
routed rows to one spill file under OUT/_work/spill/, ordered by unit, and
sends each unit only ids and where its rows lie in that file, so what the
runner holds (the DirectRunner keeps a shuffle in memory) is 8 bytes a row,
not the vector; vectors stay in their stored precision (float16 for embed's
default) in the spill files and the keep step. Only star forests travel to
the components step (bounded by the samples that have a duplicate), and only
the members of some group travel to the keep step. Each unit's links are
cached under OUT/_work/links/, so a rerun after a kill recomputes only the
units that had not finished.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam import storage
from clipbeam.dedup.clusters import PROBER, QUERY, TARGET, Quantizer, route
from clipbeam.dedup.components import Forests, merge_forests, star_forest
from clipbeam.dedup.keep import COLUMNS, Member, family_rows, rank_column
from clipbeam.dedup.links import BlockLinks, best_per_id, block_links
from clipbeam.layout import UnitLedger
from clipbeam.layout.dedup import SCHEMA, WORK, groups_file
from clipbeam.layout.embeddings import part_name
from clipbeam.layout.embeddings.input_parts import EmbeddingsPart
from clipbeam.layout.embeddings.read import iter_batches

HISTOGRAM_BINS = 100  # nearest-neighbour similarity in [0, 1], 0.01 wide
SPILL = "spill"


@dataclass(frozen=True)
class DedupConfig:
    """Everything the workers need, decided before the pipeline starts."""

    output: str
    storage_options: dict
    column: str
    id_column: str
    dim: int
    thresholds: tuple[float, ...]
    keep: str
    probe: int
    quantizer: Quantizer | None  # set by the command once the centroids are trained or loaded
    blocks: np.ndarray | None    # blocks per cluster, from the sample's cluster sizes
    batch_rows: int
    dtype: str                   # the stored vectors' precision (float16 | float32): batches, spill files and
                                 # members keep it
    parts: int
    hashes: bool
    ledger: UnitLedger | None

    def url(self, *names: str) -> str:
        return storage.join(self.output, *names)


def _batches(part: EmbeddingsPart, config: DedupConfig, columns: list[str], with_id: bool = False):
    return iter_batches(part.file, config.column, config.id_column if with_id else None, columns, config.dim,
                        batch_rows=config.batch_rows, storage_options=config.storage_options, dtype=config.dtype)


def read_hashes(part: EmbeddingsPart, config: DedupConfig) -> Iterable[tuple[str, int]]:
    """(sha256, global row) for every row with a hash and an image vector."""
    for batch in _batches(part, config, ["sha256"]):
        for sha, gid in zip(batch.metadata.column("sha256").to_pylist(), batch.ids.tolist(), strict=True):
            if sha:
                yield sha, gid


def exact_forests(item: tuple[str, Iterable[int]], thresholds: tuple[float, ...]):
    """One hash's rows, if more than one: a star forest at every threshold (identical bytes join at all)."""
    _, gids = item
    gids = np.fromiter(gids, np.int64)
    if len(gids) > 1:
        forest = star_forest(gids, np.full(len(gids), gids.min()))
        yield {t: forest for t in thresholds}


def route_part(part: EmbeddingsPart, config: DedupConfig):
    """(unit key, (side, ids, spill url, first row)) for every unit each row of the part is compared in.

    Each batch's routed rows go to one spill file, a unit's rows of one side contiguous in it.
    """
    for number, batch in enumerate(_batches(part, config, [])):
        nearest = config.quantizer.assign(batch.vectors, config.probe)
        routed = route(batch.ids, nearest, config.blocks)
        url = config.url(WORK, SPILL, f"{part_name(part.number)}-{number:05d}.bin")
        with storage.atomic_open(url, "wb", config.storage_options) as handle:
            for piece in routed:
                handle.write(batch.vectors[piece.rows].astype(config.dtype, copy=False).tobytes())
        first = 0
        for piece in routed:
            yield piece.key, (piece.side, batch.ids[piece.rows], url, first)
            first += len(piece.rows)


def _read_spilled(pieces: list, config: DedupConfig) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(side, ids, float32 vectors) of a unit's pieces, one open per spill file and one read per piece."""
    row_bytes = config.dim * np.dtype(config.dtype).itemsize
    found = []
    for url in sorted({p[2] for p in pieces}):
        with storage.open_input(url, config.storage_options) as handle:
            for side, gids, _, first in sorted((p for p in pieces if p[2] == url), key=lambda p: p[3]):
                handle.seek(first * row_bytes)
                data = np.frombuffer(handle.read(len(gids) * row_bytes), config.dtype)
                found.append((side, gids, data.reshape(len(gids), config.dim).astype(np.float32)))
    return found


def _unit_name(key: tuple[int, ...]) -> str:
    return "-".join(str(k) for k in key)


class Links(beam.DoFn):
    """One unit's links, read from the cache of an earlier run or computed and cached."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config

    def process(self, item):
        key, chunks = item
        config = self.config
        url = config.url(WORK, "links", f"{_unit_name(key)}.npz")
        if storage.exists(url, config.storage_options):
            yield _load_links(url, config)
            return
        sides = {QUERY: [], TARGET: [], PROBER: []}
        for side, gids, vectors in _read_spilled(list(chunks), config):
            sides[side].append((gids, vectors))
        same = key[1] == key[2]
        q_ids, queries = _stack(sides[QUERY], config.dim)
        t_ids, targets = (q_ids, queries) if same else _stack(sides[TARGET], config.dim)
        if key[3] == 0:  # the members of the two blocks with each other
            found = block_links(q_ids, queries, t_ids, targets, config.thresholds, same)
        else:            # only a share of the probers meets this block
            found = block_links(q_ids[:0], queries[:0], t_ids, targets, config.thresholds, same=False)
        p_ids, probers = _stack(sides[PROBER], config.dim)
        if len(p_ids):  # probers come to diagonal units only: their members are the QUERY side
            probed = block_links(p_ids, probers, q_ids, queries, config.thresholds, same=False)
            found = BlockLinks({t: merge_forests([found.forests[t], probed.forests[t]]) for t in config.thresholds},
                               np.concatenate([found.nn_ids, probed.nn_ids]),
                               np.concatenate([found.nn_max, probed.nn_max]))
        if len(t_ids) and len(q_ids) + len(p_ids) > 1:  # a unit with nothing to compare costs nothing to redo
            _save_links(url, found, config)
        yield found


def _stack(pieces: list, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not pieces:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def _save_links(url: str, found: BlockLinks, config: DedupConfig) -> None:
    arrays = {"nn_ids": found.nn_ids, "nn_max": found.nn_max}
    for i, t in enumerate(config.thresholds):
        arrays[f"nodes{i}"], arrays[f"roots{i}"] = found.forests[t]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with storage.atomic_open(url, "wb", config.storage_options) as handle:
        handle.write(buffer.getvalue())


def _load_links(url: str, config: DedupConfig) -> BlockLinks:
    with storage.open_input(url, config.storage_options) as handle:
        data = np.load(io.BytesIO(handle.read()))
        forests = {t: (data[f"nodes{i}"], data[f"roots{i}"]) for i, t in enumerate(config.thresholds)}
        return BlockLinks(forests, data["nn_ids"], data["nn_max"])


class ComponentsFn(beam.CombineFn):
    """Star forests per threshold in, the merged components out: {threshold: (nodes, roots)}."""

    def __init__(self, thresholds: tuple[float, ...]) -> None:
        self.thresholds = thresholds

    def create_accumulator(self):
        return Forests(self.thresholds)

    def add_input(self, accumulator, forests):
        return accumulator.add(forests)

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        for other in accumulators[1:]:
            accumulators[0].merge(other)
        return accumulators[0]

    def extract_output(self, accumulator):
        return accumulator.reduce()


class NearestFn(beam.CombineFn):
    """Each unit's (ids, best similarities) in, a histogram of every row's best similarity out."""

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, found: BlockLinks):
        accumulator.append((found.nn_ids, found.nn_max))
        if sum(len(a[0]) for a in accumulator) > 4_000_000:  # keep one value per row, not one per unit
            accumulator[:] = [self._best(accumulator)]
        return accumulator

    def merge_accumulators(self, accumulators):
        return [self._best([piece for accumulator in accumulators for piece in accumulator])]

    @staticmethod
    def _best(pieces):
        if not pieces:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return best_per_id(np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]))

    def extract_output(self, accumulator):
        _, best = self._best(accumulator)
        counts, _ = np.histogram(np.clip(best, 0, 1), bins=HISTOGRAM_BINS, range=(0, 1))
        return {"bins": HISTOGRAM_BINS, "range": [0, 1], "counts": counts.tolist(), "rows": int(len(best))}


def read_members(part: EmbeddingsPart, config: DedupConfig, components: dict):
    """(group at the lowest threshold, Member with its group at every threshold) for every row of the part
    in a group (a row in a group at any threshold is in one at the lowest)."""
    columns = [*(["sha256"] if config.hashes else []), *COLUMNS[config.keep]]
    for batch in _batches(part, config, columns, with_id=True):
        groups = np.stack([_roots(*components[t], batch.ids) for t in config.thresholds], axis=1)
        found = np.flatnonzero(groups[:, -1] >= 0)
        if not len(found):
            continue
        ranks = rank_column(config.keep, batch.metadata, batch.ids)
        ids = batch.metadata.column("id").to_pylist()
        hashes = batch.metadata.column("sha256").to_pylist() if config.hashes else [None] * len(ids)
        for row in found:
            member = Member(int(batch.ids[row]), ids[row], int(ranks[row]), hashes[row],
                            batch.vectors[row].astype(config.dtype), tuple(int(g) for g in groups[row]))
            yield int(groups[row, -1]), member


def _roots(nodes: np.ndarray, roots: np.ndarray, gids: np.ndarray) -> np.ndarray:
    """Each gid's root in a star forest, -1 for a gid not in it."""
    if not len(nodes):
        return np.full(len(gids), -1, np.int64)
    where = np.minimum(np.searchsorted(nodes, gids), len(nodes) - 1)
    return np.where(nodes[where] == gids, roots[where], -1)


def write_part(item: tuple[int, Iterable[dict]], config: DedupConfig) -> dict:
    """groups/part-NNNNN.parquet (sorted by threshold, group, kept first, id) and its done-marker."""
    number, rows = item
    rows = sorted(rows, key=lambda r: (r["threshold"], r["group"], not r["kept"], r["id"]))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    name = groups_file(number)
    with storage.atomic_open(config.url(name), "wb", config.storage_options) as handle:
        pq.write_table(table, handle)
    counts = {}
    for t in config.thresholds:
        at = [r for r in rows if r["threshold"] == t]
        groups = {r["group"]: r["kind"] for r in at}
        counts[str(t)] = {"rows": len(at), "groups": len(groups),
                          "exact_groups": sum(1 for k in groups.values() if k == "exact")}
    record = {"number": number, "path": name, "rows": len(rows), "counts": counts}
    if config.ledger is not None:
        config.ledger.mark_done(part_name(number), record, files=[name])
    return record


class Dedup(beam.PTransform):
    """PCollection[EmbeddingsPart] -> the written parts' records; the histogram goes to OUT/_work/nn.json."""

    def __init__(self, config: DedupConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, parts):
        config = self.config
        parts = parts | "Spread" >> beam.Reshuffle()
        links = (parts
                 | "Route" >> beam.FlatMap(route_part, config)
                 | "ByUnit" >> beam.GroupByKey()
                 | "Links" >> beam.ParDo(Links(config)))
        forests = [links | "Forests" >> beam.Map(lambda found: found.forests)]
        if config.hashes:
            forests.append(parts
                           | "ReadHashes" >> beam.FlatMap(read_hashes, config)
                           | "ByHash" >> beam.GroupByKey()
                           | "Exact" >> beam.FlatMap(exact_forests, config.thresholds))
        components = (forests | "AllForests" >> beam.Flatten()
                      | "Components" >> beam.CombineGlobally(ComponentsFn(config.thresholds)))
        _ = (links
             | "Nearest" >> beam.CombineGlobally(NearestFn())
             | "SaveHistogram" >> beam.Map(lambda h: storage.write_json(config.url(WORK, "nn.json"), h,
                                                                         config.storage_options)))
        return (parts
                | "Members" >> beam.FlatMap(read_members, config, beam.pvalue.AsSingleton(components))
                | "ByGroup" >> beam.GroupByKey()
                | "Rows" >> beam.FlatMap(lambda item: family_rows(config.thresholds, item[1]))
                | "ByPart" >> beam.Map(lambda row: (row["group"] % config.parts, row))
                | "ToPart" >> beam.GroupByKey()
                | "Write" >> beam.Map(write_part, config))
