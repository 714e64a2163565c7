"""One training job as several processes (one per host of a TPU slice or GPU cluster):
joining the job, failing fast, a start-up line, and which data each process reads.

Runtime. `train.distributed` holds the keyword arguments of `jax.distributed.initialize`
({} auto-detects Cloud TPU, SLURM, Open MPI, Kubernetes; else `coordinator_address`,
`num_processes`, `process_id`); `heartbeat_timeout_seconds` (default 100) bounds how long
a dead peer goes unnoticed. On CPU the collectives across processes need gloo
(JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo), which makes this path testable on one machine.

Failure. JAX's coordination service aborts every process once a peer has missed
heartbeats for the heartbeat timeout ("... detected fatal errors. This most likely
indicates that another task died"), and aborts a process that cannot reach the others
within `initialization_timeout`. A peer that fails with a *Python* error would instead
wait at JAX's shutdown barrier while the others block in a collective: a hang.
`fail_fast()` therefore ends a failed process at once (after printing its error), so its
silence stops the others within the heartbeat timeout.

Data. The input is cut into `num_data_shards` shards (seqio `ShardInfo`), a multiple of
the process count; process p reads shards [p·k, (p+1)·k) and its local batch is their
batches stacked in shard order. The global batch, and so the losses, do not depend on how
many processes read it, and each shard's iterator position is saved in its own file, so a
run resumes exactly on any process count that divides its shard count.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import sys
import traceback
from typing import Any, Mapping

import jax
import numpy as np

from prealign_jax import tf_cpu
from prealign_jax.data import pipeline
from prealign_jax.errors import UserError

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)


class MultihostError(UserError):
    """A multi-process configuration that cannot work (names the binding to change)."""


def initialize(kwargs: Mapping[str, Any]) -> None:
    """`jax.distributed.initialize(**kwargs)` (`train.distributed`), saying first on stderr
    which job this process joins, so that a process aborted by JAX for a missing peer
    (DEADLINE_EXCEEDED at RegisterTask) shows what it was waiting for."""
    who = (f"process {kwargs['process_id']} of {kwargs.get('num_processes', '?')}"
           if "process_id" in kwargs else "a process (cluster auto-detected)")
    _stderr(f"{who} on {socket.gethostname()}: joining the job at "
            f"{kwargs.get('coordinator_address') or 'the detected coordinator'}; all must "
            f"join within {kwargs.get('initialization_timeout', 300)}s "
            "(train.distributed['initialization_timeout'])")
    try:
        jax.distributed.initialize(**kwargs)
    except (TypeError, ValueError) as e:  # a bad key, or no cluster found and none given
        raise MultihostError(
            f"train.distributed={dict(kwargs)}: {str(e).splitlines()[0]} Run under a "
            "scheduler JAX detects (Cloud TPU, SLURM, Open MPI, Kubernetes) or give "
            "coordinator_address, num_processes and process_id") from None


@contextlib.contextmanager
def fail_fast():
    """Run the body as this process's part of the job; if it fails in a multi-process
    job, print the error and exit at once (see the module docstring: the others then stop
    within the heartbeat timeout instead of hanging)."""
    try:
        yield
    except BaseException as e:
        if not jax.distributed.is_initialized() or (
                isinstance(e, SystemExit) and not e.code):
            raise
        if isinstance(e, UserError):
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message, code = f"prealign: error: {text}", 2
        else:
            message, code = traceback.format_exc().rstrip(), 1
        _stderr(f"a process on {socket.gethostname()} failed; ending it now so that the "
                f"others stop within the heartbeat timeout:\n{message}")
        sys.stdout.flush()
        os._exit(code)


def describe(mesh: jax.sharding.Mesh) -> str:
    """One start-up line that makes a missing host or device visible: processes, devices,
    platform, and each process's device count."""
    per_process = collections.Counter(d.process_index for d in mesh.devices.flat)
    counts = ", ".join(str(per_process[p]) for p in range(jax.process_count()))
    return (f"job: {jax.process_count()} process(es) | {jax.device_count()} "
            f"{jax.devices()[0].platform} devices | devices per process: {counts}")


def _stderr(line: str) -> None:
    print(f"prealign: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data shards
def data_shards(num_data_shards: int | None = None) -> list[seqio.ShardInfo]:
    """The data shards this process reads: shards [p·k, (p+1)·k) of `num_data_shards`
    (None: one per process), k = num_data_shards / process count."""
    processes, index = jax.process_count(), jax.process_index()
    total = num_data_shards or processes
    if total % processes:
        raise MultihostError(f"seqio_data.num_data_shards={total} must be a multiple of the "
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
                raise MultihostError(
                    f"{directory}: no data position for data shard {shard.index} of "
                    f"{shard.num_shards}; the run was saved with {' or '.join(saved) or 'no'} "
                    f"data shards: set seqio_data.num_data_shards to that (a multiple of the "
                    "process count) to resume it")
            iterator.restore(prefix)


def _shard_prefix(directory: str, shard: seqio.ShardInfo) -> str:
    return os.path.join(str(directory), f"shard_{shard.index}_of_{shard.num_shards}")
