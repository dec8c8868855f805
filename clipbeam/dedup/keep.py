"""Which sample a group keeps, and the rows a group becomes.

`--keep first` keeps the earliest row of the corpus (embeddings parts in
manifest order, rows in order); `longest-caption` the longest caption;
`largest-image` the most pixels. Ties go to the smallest id, so a rerun keeps
the same sample whatever order the workers saw the members in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

RULES = ("first", "longest-caption", "largest-image")
COLUMNS = {"first": (), "longest-caption": ("caption",), "largest-image": ("width", "height")}


def rank_column(rule: str, table: pa.Table, gids: np.ndarray) -> np.ndarray:
    """Per row, a number that is smaller for the row the rule prefers (int64)."""
    if rule == "first":
        return np.asarray(gids, np.int64)
    if rule == "longest-caption":
        lengths = pc.fill_null(pc.utf8_length(table.column("caption")), 0)
        return -lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    if rule == "largest-image":
        width = pc.fill_null(table.column("width"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        height = pc.fill_null(table.column("height"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return -(width * height)
    raise ValueError(f"keep rule must be one of {', '.join(RULES)}, not {rule!r}")


@dataclass(frozen=True)
class Member:
    """One sample of a group, as the keep step sees it."""

    gid: int
    id: str
    rank: int
    sha256: str | None
    vector: np.ndarray  # in the stored precision (float16 for embed's default): what travels is half the size
    groups: tuple[int, ...] = ()  # its group at each threshold, highest first (-1: in none)

    @property
    def order(self) -> tuple[int, str]:
        return self.rank, self.id


def group_rows(group: int, threshold: float, members: Iterable[Member]) -> list[dict]:
    """The group's output rows: the kept member first, then the others by id.

    Two passes over `members` (a re-iterable, as a Beam grouping is): the first
    finds the kept member, the second computes each one's cosine to it, so only
    one vector besides the current one is held.
    """
    kept, hashes, count = None, set(), 0
    for member in members:
        count += 1
        hashes.add(member.sha256)
        if kept is None or member.order < kept.order:
            kept = member
    if kept is None or count < 2:
        return []
    kind = "exact" if len(hashes) == 1 and None not in hashes else "near"
    rows = []
    for member in members:
        similarity = 1.0 if member.gid == kept.gid else \
            float(np.dot(member.vector.astype(np.float32), kept.vector.astype(np.float32)))
        rows.append({"id": member.id, "group": int(group), "threshold": float(threshold), "kind": kind,
                     "kept": member.gid == kept.gid, "kept_id": kept.id, "similarity_to_kept": similarity})
    rows.sort(key=lambda r: (not r["kept"], r["id"]))
    return rows


def family_rows(thresholds: tuple[float, ...], members: Iterable[Member]) -> list[dict]:
    """The rows of one group at the lowest threshold and of every group at a higher one inside it.

    A link at a higher threshold is a link at the lowest, so each higher group lies inside one lowest
    group: a member travels once with its groups at every threshold, not once per threshold.
    """
    members = list(members)
    rows = []
    for at, threshold in enumerate(thresholds):
        groups: dict[int, list[Member]] = {}
        for member in members:
            if member.groups[at] >= 0:
                groups.setdefault(member.groups[at], []).append(member)
        for group, inside in groups.items():
            rows += group_rows(group, threshold, inside)
    return rows
