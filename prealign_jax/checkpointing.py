"""Checkpoints of a training run: train state + data-iterator position, saved by orbax.

One step directory holds two items (step 0 may hold parameters alone: the starting point
`prealign import` writes, `save_params`):
- `state`: the train state (a pytree of global jax.Arrays), written asynchronously. It is
  restored onto an *abstract target* carrying the current shardings, so a run saved on one
  mesh (say fsdp=4 x tensor=2) resumes on another (one device, data=8).
- `data`: the tf.data iterator of every data shard (`shard_<j>_of_<n>` files, see
  `data/feed.py`), written synchronously with `tf.train.Checkpoint`
  (`data.pipeline.DataIterator.save`), which records the iterator's internal position
  (file offsets, shuffle and packing buffers, prefetched elements). The trainer pulls
  exactly one batch per step and never reads ahead of the iterator, so the restored
  iterator yields the very batch the uninterrupted run would have read next: resume is
  exact for any deterministic pipeline, and costs O(buffer size), not a replay of the
  data seen so far. A restore needs the same number of data shards, read by any number
  of processes that divides it.

Each step's orbax metadata also records the data batches' shapes; a restore compares them
and the saved state's shapes with this run's first, so a run resumed with another
ModelConfig, train.batch_size or train.seq_len is refused in one line (`CheckpointError`)
instead of failing deep in orbax or TF, or silently reading other batches.

Preemption: on one process a SIGTERM sets a flag the loop polls (`reached_preemption`);
with several processes orbax's preemption sync point (JAX's distributed preemption
notifier) picks one step all processes agree on. Either way the loop saves at that step
and waits for the save before exiting.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from prealign_jax import fileio
from prealign_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that this run's configuration cannot resume."""


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves/restores the data position through the iterator's own `save(directory)` /
    `restore(directory)` (`feed.ShardedIterator`: one file per data shard, written
    and read by the process that reads that shard)."""

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        args.iterator.save(str(directory))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        args.iterator.restore(str(directory))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any  # has save(directory): writes its position there


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any  # a fresh iterator over the same pipeline; restore(directory) moves it


class Checkpoints:
    """The run's `CheckpointManager` (in `<workdir>/checkpoints`) plus preemption handling.

    Saves every `every` steps asynchronously and keeps the latest `keep`; `save(...,
    force=True)` saves at any step (preemption, end of run).
    """

    def __init__(self, workdir: str, every: int, keep: int):
        self.directory = epath.Path(workdir) / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),  # (metadata reads)
                           "data": DataIteratorHandler()},
            options=ocp.CheckpointManagerOptions(
                # Only multiples of `every`: preemption and the final step are forced saves.
                save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
                preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                enable_async_checkpointing=True, cleanup_tmp_directories=True))
        self._sigterm = False
        self._previous_handler = (signal.signal(signal.SIGTERM, self._on_sigterm)
                                  if jax.process_count() == 1 else None)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._sigterm = True

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True once a SIGTERM arrived (one process) or at the agreed preemption step."""
        return self._sigterm or self._manager.reached_preemption(step)

    def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
        """Start an async save of `state` and the iterator position after `step` steps."""
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataIteratorSave(iterator)), force=force,
            custom_metadata={"data": {"num_shards": iterator.num_shards,
                                      "batch_shapes": iterator.batch_shapes}})

    def restore(self, step: int, abstract_state, iterator):
        """The state saved at `step`, laid out as `abstract_state` says (shapes, dtypes and
        the *current* shardings); `iterator` is moved to the saved position in place.
        Raises `CheckpointError` if the state or the batches have other shapes than saved."""
        where = self.directory / str(step)
        saved = self._manager.metadata(step).custom_metadata.get("data")
        if saved and saved["num_shards"] == iterator.num_shards:  # (else: feed says so)
            _check_batches(where, saved["num_shards"], saved["batch_shapes"],
                           iterator.batch_shapes)
        _check_state(where, _shapes(self._manager.item_metadata(step)["state"]),
                     _shapes(abstract_state))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=DataIteratorRestore(iterator)))
        return restored.state

    def save_params(self, step: int, params) -> None:
        """Save parameters alone at `step` and wait: a run's starting point (`prealign
        import`), with no optimizer state and no data position (see `restore_params`)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params})), force=True)
        self._manager.wait_until_finished()

    def restore_params(self, step: int, abstract_params):
        """The parameters saved at `step`, laid out as `abstract_params` says; raises
        `CheckpointError` if they have other shapes."""
        target = {"params": abstract_params}
        _check_state(self.directory / str(step),
                     _shapes(self._manager.item_metadata(step)["state"]), _shapes(target))
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release the manager and the SIGTERM handler."""
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def saved_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in `<workdir>/checkpoints`, ascending ([] if none)."""
    gfile, directory = fileio.gfile(), os.path.join(workdir, "checkpoints")
    # (on GCS, listdir names sub-directories with a trailing slash)
    return sorted(int(d.rstrip("/")) for d in gfile.listdir(directory)
                  if d.rstrip("/").isdigit()) if gfile.isdir(directory) else []


def read_params(step_dir: str, abstract_params):
    """The parameters of a saved step, `<workdir>/checkpoints/<step>` (a whole train state
    or parameters alone), laid out as `abstract_params` says (shapes, dtypes, the current
    shardings); the optimizer state is not read. What inference and fine-tuning start from."""
    item = {"params": abstract_params}
    return ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item)))["params"]


def _check_batches(where, num_shards: int, saved: dict, now: dict) -> None:
    """Refuse other batch rows or lengths: the saved position counts batches of one shape."""
    for feature in sorted(saved):
        (rows, length), (now_rows, now_length) = saved[feature], now[feature]
        if rows != now_rows:
            raise CheckpointError(
                f"{where}: saved with train.batch_size={rows * num_shards} ({rows} rows per "
                f"data shard), this run has {now_rows * num_shards}; the saved data position "
                f"counts batches of that size: resume with train.batch_size="
                f"{rows * num_shards} or use a new --workdir")
        if length != now_length:
            raise CheckpointError(f"{where}: saved with train.seq_len={length}, this run has "
                                  f"{now_length}; resume with train.seq_len={length} or use a "
                                  "new --workdir")


def _check_state(where, saved: dict, now: dict) -> None:
    """Refuse a state of other shapes, naming a parameter (before any optimizer leaf)."""
    differing = sorted((not path.startswith("params/"), path)
                       for path in saved.keys() | now.keys() if saved.get(path) != now.get(path))
    if differing:
        path = differing[0][1]
        saved_text, now_text = (f"shape {d[path]}" if path in d else "no such array"
                                for d in (saved, now))
        raise CheckpointError(f"{where}: {path} was saved with {saved_text}, this run's model "
                              f"has {now_text}: the run was saved with another ModelConfig; "
                              "resume with the run's own ModelConfig or use a new --workdir")


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Shape of every array of a state (or its saved metadata) by path ('params/embedding')."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
