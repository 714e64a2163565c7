"""The conditional-token feature converter: packed decoder batches with per-mode weights.

seqio's `LMFeatureConverter` emits 0/1 loss weights. Here every target token gets the
weight of what it is: a tag or EOS (`tag_weight`, the control tokens the model must learn
to emit) or text, weighted by the mode it is read in (`mode_weights`); padding and tokens
read after a grammar violation get 0. Modes come from the grammar's tables via `fsm_tf`
with the same segment semantics as `modes.run_jax`, so the trainer's per-mode metrics see
the modes that weighted the loss.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from prealign_jax import modes, tf_cpu
from prealign_jax.data import fsm_tf, preprocessors

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)

DEFAULT_MODE_WEIGHTS = {mode: 1.0 for mode in modes.MODES}


def pack_window(window, length: int) -> dict:
    """A window of examples (`targets`: ragged `[K, None]`) packed into rows of `length`:
    `targets`, `targets_segment_ids`, `targets_positions` (int32 `[rows, length]`), as
    `seqio.utils.trim_and_pack_dataset` packs a window of `length` examples — each trimmed
    to `length`, then next-fit — so the rows are the same, but vectorised.

    seqio's TF packer appends one example at a time in a `while_loop` of concats and hands
    rows on one by one; only the row and start of each example are sequential here (numpy
    over the window's lengths), every token is placed by one scatter, and rows stay batched
    for the conversion that follows.
    """
    def next_fit(n):
        """Row and start of each example (a pure function of the lengths)."""
        row, start = np.empty_like(n), np.empty_like(n)
        r, used = -1, length
        for i, size in enumerate(n.tolist()):
            if used + size > length:
                r, used = r + 1, 0
            row[i], start[i], used = r, used, used + size
        return row, start

    tokens = window["targets"][:, :length]
    n = tf.cast(tokens.row_lengths(), tf.int32)
    row, start = tf.numpy_function(next_fit, [n], [tf.int32, tf.int32], stateful=False)
    row.set_shape(n.shape)
    start.set_shape(n.shape)
    positions = tf.ragged.range(n)
    index, rows = tf.range(tf.size(row)), tf.reduce_max(row) + 1
    # an example's segment id: the non-empty examples of its row up to it (as seqio's
    # cumsum over position 0, which an empty example does not have)
    nonempty = tf.cumsum(tf.cast(n > 0, tf.int32))
    before_row = tf.gather(nonempty - tf.cast(n > 0, tf.int32),
                           tf.math.unsorted_segment_min(index, row, rows))
    segment = nonempty - tf.gather(before_row, row)
    where = tf.stack([tf.repeat(row, n), tf.repeat(start, n) + positions.flat_values], 1)
    shape = tf.stack([rows, length])

    def scatter(values):
        return tf.scatter_nd(where, tf.cast(values, tf.int32), shape)

    return {"targets": scatter(tokens.flat_values),
            "targets_segment_ids": scatter(tf.repeat(segment, n)),
            "targets_positions": scatter(positions.flat_values)}


def interleave(blocks):
    """The documents of a window of blocks (`[blocks, documents, tokens]`, ragged) in the
    order first of every block, then second of every block, ...: a block holds consecutive
    documents of one source, so this mixes the Mixture's sources within every row and
    batch, as sampling document by document would, without a shuffle."""
    docs = blocks.values
    block = tf.cast(blocks.value_rowids(), tf.int32)
    position = tf.range(tf.shape(block)[0]) - tf.gather(tf.cast(blocks.row_splits, tf.int32),
                                                         block)
    order = tf.argsort(position * tf.cast(blocks.nrows(), tf.int32) + block, stable=True)
    return tf.gather(docs, order)


def weight_table(mode_weights: Mapping[str, float] | None = None,
                 tag_weight: float = 1.0) -> np.ndarray:
    """`[C, M+1]` loss weight of a token by (class, mode it is read in); the last column is
    the invalid mode (weight 0)."""
    mode_weights = {**DEFAULT_MODE_WEIGHTS, **(mode_weights or {})}
    unknown = set(mode_weights) - set(modes.MODES)
    if unknown:
        raise ValueError(f"mode_weights names unknown modes {sorted(unknown)}; modes are "
                         f"{modes.MODES}")
    table = np.zeros((modes.NUM_CLASSES, len(modes.MODES) + 1), np.float32)
    table[modes.TEXT, :-1] = [mode_weights[m] for m in modes.MODES]
    for c in list(modes.TAG_CLASS.values()) + [modes.EOS_CLASS]:
        table[c, :-1] = tag_weight
    return table


class ConditionalLMFeatureConverter(seqio.FeatureConverter):
    """Decoder-only LM features, always packed, with float per-token loss weights.

    Output features (all `[length]`): decoder_target_tokens, decoder_input_tokens,
    decoder_segment_ids, decoder_positions (int32) and decoder_loss_weights (float32).
    """

    # A task example is a block of documents, [documents, tokens]
    # (preprocessors.DOCS_PER_EXAMPLE).
    TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=2,
                                                                  sequence_dim=1)}
    MODEL_FEATURES = {
        "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32),
    }
    PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

    def __init__(self, token_class: np.ndarray, mode_weights: Mapping[str, float] | None = None,
                 tag_weight: float = 1.0, policy: modes.Policy | str = modes.GRAMMAR,
                 **kwargs):
        # Documents longer than the length are trimmed by the packer, as seqio's are; the
        # length check would refuse them first.
        super().__init__(pack=True, apply_length_check=False, **kwargs)
        self._token_class = np.asarray(token_class, np.int32)
        self._weights = weight_table(mode_weights, tag_weight)
        self._tables = modes.get_policy(policy).compile()

    def _convert_batch(self, features):
        """Model features of a batch `[b, length]` of packed examples (vectorised)."""
        targets = features["targets"]
        segment_ids = features["targets_segment_ids"]
        classes = tf.gather(tf.constant(self._token_class), targets)
        read_in, _ = fsm_tf.read_in_states(self._tables, classes, segment_ids)
        mode = fsm_tf.mode_ids(self._tables, read_in)
        mode = tf.where(mode < 0, len(modes.MODES), mode)  # invalid -> last column
        weights = tf.gather_nd(tf.constant(self._weights), tf.stack([classes, mode], -1))
        # Inputs: targets shifted right; BOS at the first token of every segment.
        shifted = tf.pad(targets[:, :-1], [[0, 0], [1, 0]], constant_values=self.bos_id)
        prev_seg = tf.pad(segment_ids[:, :-1], [[0, 0], [1, 0]])
        inputs = tf.where(segment_ids == prev_seg, shifted, self.bos_id)
        return {
            "decoder_target_tokens": targets,
            "decoder_input_tokens": inputs,
            "decoder_loss_weights": tf.where(segment_ids > 0, weights, 0.0),
            "decoder_segment_ids": segment_ids,
            "decoder_positions": features["targets_positions"],
        }

    def _convert_features(self, ds, task_feature_lengths):
        length = task_feature_lengths["targets"]
        # A window of about `length` documents (seqio packs windows of `length` examples),
        # interleaved across its blocks, packed and converted at once (many rows per op);
        # rows unbatched for seqio's contract.
        blocks = max(1, length // preprocessors.DOCS_PER_EXAMPLE)
        return (ds.ragged_batch(blocks)
                .map(lambda w: self._convert_batch(pack_window(
                    {"targets": interleave(w["targets"])}, length)),
                     num_parallel_calls=tf.data.AUTOTUNE)
                .unbatch())

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["targets"]
        return {k: length for k in list(self.MODEL_FEATURES) + list(self.PACKING_FEATURE_DTYPES)}
