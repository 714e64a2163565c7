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
from prealign_jax.data import fsm_tf

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)

DEFAULT_MODE_WEIGHTS = {mode: 1.0 for mode in modes.MODES}
_CONVERT_BATCH = 64


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

    TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {
        "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32),
    }
    PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

    def __init__(self, token_class: np.ndarray, mode_weights: Mapping[str, float] | None = None,
                 tag_weight: float = 1.0, policy: modes.Policy | str = modes.GRAMMAR,
                 **kwargs):
        super().__init__(pack=True, **kwargs)
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
        ds = self._pack_or_pad(ds, task_feature_lengths)
        # Batched so the FSM runs over many examples per op; unbatched for seqio's contract.
        return (ds.batch(_CONVERT_BATCH)
                .map(self._convert_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch())

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["targets"]
        return {k: length for k in list(self.MODEL_FEATURES) + list(self.PACKING_FEATURE_DTYPES)}
