"""What the trainer reads: batches of a registered seqio Mixture, cut into data shards that
each process reads its own of, stacked into this process's rows.

The Mixture is registered at the edge (the CLI, from `tasks/`, or a notebook calling
`prealign_jax.tasks.register`), never here: the trainer takes its name, as T5X does.

The input is cut into `num_data_shards` shards (seqio `ShardInfo`), a multiple of the
process count; process p reads shards [p·k, (p+1)·k) and its local batch is their batches
stacked in shard order. The global batch, and so the losses, do not depend on how many
processes read it, and each shard's iterator position is saved in its own file, so a run
resumes exactly on any process count that divides its shard count.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np

from prealign_jax import tf_cpu, vocab
from prealign_jax.data import pipeline
from prealign_jax.errors import UserError

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)


class FeedError(UserError):
    """Data shards that cannot be read as configured (names the binding to change)."""


@dataclasses.dataclass
class DataSources:
    """What the training loop reads: for each data shard this process reads
    (`seqio.ShardInfo` -> tf.data dataset of packed batches [batch_size / num_shards,
    seq_len], see `data_shards`), and the vocabulary's `token_class[V]`.

    `train` is endless and deterministic (each shard's iterator position is checkpointed);
    `eval`, if given, is endless too and re-read from its start at every evaluation.
    `info` is recorded in the run directory (`run.json`): what inference and evaluation
    need to find the data again and read it as trained (`data_dir`, `mixture`,
    `tag_dropout`, `view`)."""

    train: Any
    eval: Any | None
    token_class: np.ndarray
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SeqioData:
    """The trainer's data (`train.data`): packed, loss-weighted batches of the registered
    seqio Mixture or Task `mixture_or_task`, prepared in `data_dir` (None: `<workdir>/data`,
    where `prealign prepare --workdir` writes).

    `num_data_shards` (None: one per process) fixes the global batch's composition: keep it
    when resuming on another number of processes (it must be a multiple of it).
    `mode_weights` / `tag_weight`: the loss weights of the conditional-token objective
    (`pipeline.get_dataset`)."""

    data_dir: str | None = None
    mixture_or_task: str = "prealign"
    eval_split: str | None = "validation"
    num_data_shards: int | None = None
    mode_weights: Mapping[str, float] | None = None
    tag_weight: float = 1.0

    def resolved_data_dir(self, workdir: str) -> str:
        return self.data_dir or os.path.join(workdir, "data")

    def __call__(self, workdir: str, batch_size: int, seq_len: int, seed: int) -> DataSources:
        shards = data_shards(self.num_data_shards)
        if batch_size % shards[0].num_shards:
            raise FeedError(f"train.batch_size={batch_size} must be a multiple of "
                            f"seqio_data.num_data_shards={shards[0].num_shards}")
        per_shard = batch_size // shards[0].num_shards

        def datasets(split):
            return {shard: pipeline.get_dataset(
                self.mixture_or_task, split, per_shard, seq_len, seed, shard_info=shard,
                mode_weights=self.mode_weights, tag_weight=self.tag_weight)
                for shard in shards}

        train_ds = datasets("train")
        provider = seqio.get_mixture_or_task(self.mixture_or_task)
        vocabulary = provider.output_features["targets"].vocabulary
        return DataSources(
            train=train_ds, eval=datasets(self.eval_split) if self.eval_split else None,
            token_class=vocab.token_classes(vocabulary),
            info={"data_dir": self.resolved_data_dir(workdir),
                  "mixture": self.mixture_or_task,
                  "tag_dropout": pipeline.tag_dropout_rate(provider),
                  "view": pipeline.view_name(provider)})


def data_shards(num_data_shards: int | None = None) -> list[seqio.ShardInfo]:
    """The data shards this process reads: shards [p·k, (p+1)·k) of `num_data_shards`
    (None: one per process), k = num_data_shards / process count."""
    processes, index = jax.process_count(), jax.process_index()
    if num_data_shards is not None and (isinstance(num_data_shards, bool) or not isinstance(
            num_data_shards, int) or num_data_shards < 1):
        raise FeedError(f"seqio_data.num_data_shards={num_data_shards!r}: a positive integer "
                        "(a multiple of the process count), or None for one per process")
    total = num_data_shards or processes
    if total % processes:
        raise FeedError(f"seqio_data.num_data_shards={total} must be a multiple of the "
                        f"{processes} processes (each reads the same number of shards)")
    k = total // processes
    return [seqio.ShardInfo(j, total) for j in range(index * k, (index + 1) * k)]


class ShardedIterator:
    """This process's batches: the next batch of each of its data shards, stacked along
    rows in shard order. Positions are saved per shard (`shard_<j>_of_<n>` files in a
    checkpoint directory), each by the process that reads it."""

    def __init__(self, datasets: Mapping[seqio.ShardInfo, tf.data.Dataset]):
        order = sorted(datasets, key=lambda shard: shard.index)
        self._iterators = {shard: pipeline.DataIterator(datasets[shard]) for shard in order}
        # What a saved position is counted in: batches of this shape, of each of the shards.
        self.num_shards = order[0].num_shards
        self.batch_shapes = {k: list(spec.shape)
                             for k, spec in datasets[order[0]].element_spec.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = []
        for shard, iterator in self._iterators.items():
            try:
                batches.append(next(iterator))
            except StopIteration:  # the datasets repeat: this shard has no examples
                raise pipeline.DataError(
                    f"data shard {shard.index} of {shard.num_shards} yields no batches: a "
                    "split with fewer records (of some task) than data shards? Lower "
                    "seqio_data.num_data_shards or prepare more data") from None
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def save(self, directory: str) -> None:
        for shard, iterator in self._iterators.items():
            iterator.save(_shard_prefix(directory, shard))

    def restore(self, directory: str) -> None:
        for shard, iterator in self._iterators.items():
            prefix = _shard_prefix(directory, shard)
            if not tf.io.gfile.exists(prefix + ".index"):
                saved = sorted({name.split("_of_")[1].split(".")[0] for name in
                                tf.io.gfile.listdir(directory) if "_of_" in name})
                raise FeedError(
                    f"{directory}: no data position for data shard {shard.index} of "
                    f"{shard.num_shards}; the run was saved with {' or '.join(saved) or 'no'} "
                    f"data shards: set seqio_data.num_data_shards to that (a multiple of the "
                    "process count) to resume it")
            iterator.restore(prefix)


def _shard_prefix(directory: str, shard: seqio.ShardInfo) -> str:
    return os.path.join(str(directory), f"shard_{shard.index}_of_{shard.num_shards}")


def global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Process-local batch -> global jax.Arrays (rows of all processes, concatenated)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
