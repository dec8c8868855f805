"""FAISS indexes without Beam: choosing a factory, training, shards, tuning, searching.

Usable from a notebook, Spark or Ray as a plain library; `clipbeam index`
wraps it in a Beam pipeline.
"""

from clipbeam.index.errors import IndexInputError
from clipbeam.index.factory import FactoryChoice, choose_factory, parse_memory
from clipbeam.index.sharded import ShardedIndex

__all__ = ["FactoryChoice", "IndexInputError", "ShardedIndex", "choose_factory", "parse_memory"]
