"""The one function the trainer calls: packed, loss-weighted batches from a Task/Mixture.

    prealign_jax.tasks.register("/path/to/data")   # at the edge: the Mixture "prealign"
    ds = get_dataset("prealign", "train", batch_size=32, length=256, seed=0)
    it = DataIterator(ds)
    batch = next(it)          # dict of numpy arrays, shapes [batch, length]
    it.save(prefix); it.restore(prefix)   # exact resume (tf.train.Checkpoint of the iterator)

Deterministic for a fixed seed and shard_info: the same batches in the same order. Resume
is by iterator checkpoint (T5X style), not by step index: the pipeline shuffles, mixes and
packs, so step n is only reachable by replaying the steps before it.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

from prealign_jax import tf_cpu, vocab as vocab_lib
from prealign_jax.data import converter as converter_lib
from prealign_jax.data import baselines, preprocessors
from prealign_jax.errors import UserError

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)


class DataError(UserError):
    """A bad record or shard met while reading (names the shard file and record index)."""


def get_dataset(mixture_or_task: str, split: str, batch_size: int, length: int, seed: int,
                shard_info: seqio.ShardInfo | None = None, num_epochs: int | None = None,
                mode_weights: Mapping[str, float] | None = None, tag_weight: float = 1.0,
                shuffle: bool = True) -> tf.data.Dataset:
    """Batches `{decoder_target_tokens, decoder_input_tokens, decoder_segment_ids,
    decoder_positions: int32[B, L], decoder_loss_weights: float32[B, L]}`.

    Args:
      mixture_or_task: a registered seqio Mixture or Task name (`tasks.register`'s).
      split: 'train' or 'validation'.
      batch_size: examples per batch *of this process* (global batch / process count).
      length: tokens per packed example.
      seed: shuffling and mixing seed; same seed, same batches.
      shard_info: this process's shard (`seqio.ShardInfo(jax.process_index(),
        jax.process_count())`); each process reads its own shard files.
      num_epochs: None repeats forever (training); 1 for one pass (evaluation).
      mode_weights: loss weight of text per mode ({'doc', 'human', 'ai', 'quote'}: float,
        default 1.0 each).
      tag_weight: loss weight of tag and EOS tokens (default 1.0).
      shuffle: shuffle files and examples (turn off for ordered evaluation).
    """
    provider = registered(mixture_or_task)
    missing = [t.name for t in _tasks_of(provider) if split not in t.splits]
    if missing:
        raise UserError(f"split {split!r} has no documents of {', '.join(missing)}; raise "
                        "prepare.validation_fraction (or set that source's rate to 0 in "
                        "tasks.register.rates) and rerun `prealign prepare`")
    vocab = next(iter(provider.output_features.values())).vocabulary
    feature_converter = converter_lib.ConditionalLMFeatureConverter(
        vocab_lib.token_classes(vocab), mode_weights=mode_weights, tag_weight=tag_weight)
    ds = seqio.get_dataset(provider, task_feature_lengths={"targets": length},
                           feature_converter=feature_converter, dataset_split=split,
                           shuffle=shuffle, num_epochs=num_epochs, shard_info=shard_info,
                           seed=seed, batch_size=batch_size, verbose=False)
    options = tf.data.Options()
    options.deterministic = True
    if isinstance(vocab, vocab_lib.TokenizerVocabulary):
        # Its tf.py_function is a pure function of its input: the iterator position is
        # exact without its "state" (otherwise TF refuses to save the position).
        options.experimental_external_state_policy = (
            tf.data.experimental.ExternalStatePolicy.IGNORE)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def registered(mixture_or_task: str):
    """The registered seqio Mixture or Task of that name, or a one-line error."""
    try:
        return seqio.get_mixture_or_task(mixture_or_task)
    except ValueError:
        raise UserError(f"no seqio task or mixture {mixture_or_task!r} is registered; call "
                        "prealign_jax.tasks.register(data_dir) first (the CLI does)") from None


def _tasks_of(provider) -> list:
    return provider.tasks if isinstance(provider, seqio.Mixture) else [provider]


def tag_dropout_rate(provider) -> float:
    """The largest `preprocessors.tag_dropout` rate of a Mixture's or Task's preprocessors:
    1.0 for a run that never reads a tag (the baseline), recorded with the run."""
    return float(max((k["rate"] for k in _keywords(provider, preprocessors.tag_dropout)),
                     default=0.0))


def view_name(provider) -> str | None:
    """The `baselines.view` a Mixture's or Task's documents are read through (None: as
    prepared), recorded with the run: evaluation prompts the run as its view says."""
    return next((k["name"] for k in _keywords(provider, baselines.view)), None)


def _keywords(provider, fn) -> list[dict]:
    """The keyword arguments of each `functools.partial(fn, ...)` preprocessor."""
    return [p.keywords for t in _tasks_of(provider) for p in t.preprocessors
            if isinstance(p, functools.partial) and p.func is fn]


class DataIterator:
    """Numpy batches from a dataset, with bad-record failures raised as `DataError` and an
    exactly resumable position (`save` / `restore` write a tf.train.Checkpoint)."""

    def __init__(self, ds: tf.data.Dataset):
        self._it = iter(ds)
        self._ckpt = tf.train.Checkpoint(iterator=self._it)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._it)
        except tf.errors.InvalidArgumentError as e:
            raise _data_error(e) from None
        return {k: v.numpy() for k, v in batch.items()}

    def save(self, prefix: str) -> str:
        """Write the position under `prefix` (e.g. inside a checkpoint step dir)."""
        return self._ckpt.write(prefix)

    def restore(self, prefix: str) -> None:
        self._ckpt.read(prefix).assert_consumed()


def _data_error(e: Exception) -> Exception:
    message = str(getattr(e, "message", e))
    if preprocessors.ERROR_MARKER in message:
        detail = message.split(preprocessors.ERROR_MARKER, 1)[1].split("\n", 1)[0]
        detail = re.sub(r"[\[\]]", "", detail).replace("\\'", "'")
        return DataError(" ".join(detail.split()))
    return e
