"""The Beam pipeline of `clipbeam index`, for runners with many workers: the steps of clipbeam.index.build.

BuildShards: sample and train once (or reuse the trained index: --append, or a
rerun after training finished) -> spread the shard plans over workers -> each
worker fills copies of the trained empty index with its shards' rows and marks
each shard done. TuneShards then tunes nprobe/efSearch on all shards together.
The command runs the same steps without Beam when no Beam option is given.
"""

from __future__ import annotations

import apache_beam as beam

from clipbeam import storage
from clipbeam.index.build import BuiltShard, IndexConfig, ShardBuilder, sample_and_train, tune_shards
from clipbeam.index.plan import ShardPlan
from clipbeam.layout.index import WORK


def _sample_and_train(_, config: IndexConfig) -> dict:
    return sample_and_train(config)


class BuildShard(beam.DoFn):
    """Fill one copy of the trained empty index with a shard's rows; exact neighbours of the queries on the way."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self._builder: ShardBuilder | None = None

    def setup(self) -> None:
        self._builder = ShardBuilder(self.config)

    def process(self, plan: ShardPlan, train_info: dict):
        yield self._builder.build(plan)


class BuildShards(beam.PTransform):
    """PBegin -> PCollection[BuiltShard]: the shards in `pending` built, the `built` ones passed through.

    Training runs unless `trained` says an earlier run of the same plan already
    stored the trained index and the queries.
    """

    def __init__(self, config: IndexConfig, pending: list[ShardPlan], built: list[BuiltShard],
                 trained: bool) -> None:
        super().__init__()
        self.config, self.pending, self.built, self.trained = config, pending, built, trained

    def expand(self, pbegin):
        config = self.config
        if self.trained:
            train_info = pbegin | "TrainedBefore" >> beam.Create(
                [storage.read_json(config.url(WORK, "train.json"), config.storage_options)])
        else:
            train_info = (pbegin
                          | "Start" >> beam.Create([None])
                          | "SampleAndTrain" >> beam.Map(_sample_and_train, config))
        fresh = (pbegin
                 | "Shards" >> beam.Create(self.pending)
                 | "Spread" >> beam.Reshuffle()
                 | "Build" >> beam.ParDo(BuildShard(config), beam.pvalue.AsSingleton(train_info)))
        earlier = pbegin | "BuiltBefore" >> beam.Create(self.built)
        return (fresh, earlier) | "AllShards" >> beam.Flatten()


class TuneShards(beam.PTransform):
    """PCollection[BuiltShard] -> one tuning result, measured on all of them together."""

    def __init__(self, config: IndexConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, shards):
        return (shards
                | "Gather" >> beam.combiners.ToList()
                | "Tune" >> beam.Map(tune_shards, self.config))
