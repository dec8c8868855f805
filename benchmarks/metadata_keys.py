"""Sidecars with many keys: what writing one embed part costs as the keys grow (issue 22 item 9).

Builds rows whose sidecar metadata holds K distinct keys each (two rows, as in
the hostile review: 2 sidecars of 20,000 keys gave a 40,010-column part in
17.7 s), then times the fragment table (the key merge and the fold
of the keys over --max-metadata-columns into json_raw) and the part's cap after
merging. Prints seconds and the part's column count for each K: the time should
grow about linearly with K, and the columns stay at the cap.

    .venv/bin/python benchmarks/metadata_keys.py --keys 10000 20000 40000
"""

from __future__ import annotations

import argparse
import time

from clipbeam.layout.embeddings.metadata import DEFAULT_MAX_METADATA_COLUMNS, cap_metadata_columns
from clipbeam.layout.embeddings.schema import embedding_table


def rows(keys: int, count: int) -> list[dict]:
    return [{"id": f"s{n}", "source": "shard.tar", "caption": None, "image_embedding": [0.0] * 4,
             "text_embedding": None, "width": 1, "height": 1, "sha256": "0",
             "meta": {f"k{n}_{i:06d}": i for i in range(keys)}} for n in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 20_000, 40_000])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--max-metadata-columns", type=int, default=DEFAULT_MAX_METADATA_COLUMNS)
    args = parser.parse_args()
    print(f"{'keys/row':>10} {'rows':>5} {'seconds':>9} {'columns':>8}")
    for keys in args.keys:
        batch = rows(keys, args.rows)
        started = time.perf_counter()
        table = embedding_table(batch, 4, "float32", {}, args.max_metadata_columns)
        table, _ = cap_metadata_columns(table, args.max_metadata_columns)
        seconds = time.perf_counter() - started
        print(f"{keys:>10} {args.rows:>5} {seconds:>9.3f} {table.num_columns:>8}")


if __name__ == "__main__":
    main()
