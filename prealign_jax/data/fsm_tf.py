"""The mode FSM of `modes.py` run inside a tf.data pipeline, vectorised.

`modes.run_numpy` / `modes.run_jax` step token by token; a tf.data map cannot afford a
per-token loop. Each token's class selects a *function* on states (a column of the same
transition table `modes.transition_table` builds); the state after token t is the
composition of the functions of tokens 0..t. Tokens whose function is the identity (text
in every state of the grammar, padding) cannot change the state, so they are dropped
before composing — found from the table, not assumed — and the few remaining ones (tags,
EOS, segment starts) are composed with a parallel prefix (Hillis–Steele) scan in
log2(K) gathers. Same table, same segment semantics as `modes.run_jax` (a new non-zero
segment id resets to the initial state, padding leaves it unchanged): no second copy of
any rule.
"""

from __future__ import annotations

import numpy as np

from prealign_jax import modes, tf_cpu

tf = tf_cpu.import_tf()


def read_in_states(tables: modes.PolicyTables, classes, segment_ids):
    """State each token is read in, and the state after the last token, for `[B, T]` or `[T]`.

    `classes` are token classes (int32), `segment_ids` as in `modes.run_jax` (0 = padding).
    Returns (read_in, final) int32 tensors shaped `[B, T]`/`[B]` (or `[T]`/`[]`); the
    invalid state is `tables.num_states`.
    """
    classes = tf.convert_to_tensor(classes, tf.int32)
    if classes.shape.rank == 1:
        read_in, final = read_in_states(tables, classes[None], tf.convert_to_tensor(
            segment_ids, tf.int32)[None])
        return read_in[0], final[0]
    table = modes.transition_table(tables)
    num, initial = table.shape[0], tables.initial
    seg = tf.convert_to_tensor(segment_ids, tf.int32)
    batch = tf.shape(classes)[0]

    prev = tf.concat([tf.fill([batch, 1], -1), seg[:, :-1]], axis=1)
    start = (seg != prev) & (seg != 0)
    identity = tf.range(num, dtype=tf.int32)
    # Only tokens whose function is not the identity matter (and segment starts).
    changes = tf.constant((table.T != np.arange(num)).any(axis=1))  # [C]
    active = (tf.gather(changes, classes) | start) & (seg != 0)  # [B, T]

    # fc[b, k]: the function (state -> next state) of the k-th active token of row b.
    where = tf.where(active)  # [N, 2], row-major
    cls = tf.gather_nd(classes, where)
    f = tf.where(tf.gather_nd(start, where)[:, None],
                 tf.gather(tf.constant(table[initial]), cls)[:, None],
                 tf.gather(tf.constant(table.T), cls))  # [N, S+1]
    ragged = tf.RaggedTensor.from_value_rowids(f, where[:, 0], nrows=tf.cast(batch, tf.int64))
    counts = tf.cast(ragged.row_lengths(), tf.int32)
    fc = ragged.to_tensor()
    fc = tf.where(tf.sequence_mask(counts, tf.shape(fc)[1])[..., None], fc, identity)
    count = tf.shape(fc)[1]

    def compose(k, fc):
        # fc[k'] <- fc[k'] o fc[k'-k]  (identity before the start)
        earlier = tf.concat([tf.broadcast_to(identity, [batch, tf.minimum(k, count), num]),
                             fc[:, :count - k]], axis=1)
        return k * 2, tf.gather(fc, earlier, batch_dims=2)

    _, fc = tf.while_loop(lambda k, fc: k < count, compose, (tf.constant(1), fc),
                          shape_invariants=(tf.TensorShape([]), fc.shape))
    # States after 0, 1, ... active tokens, then after every token.
    after_active = tf.concat([tf.fill([batch, 1], initial), fc[:, :, initial]], axis=1)
    after = tf.gather(after_active, tf.cumsum(tf.cast(active, tf.int32), axis=1),
                      batch_dims=1)
    before = tf.concat([tf.fill([batch, 1], initial), after[:, :-1]], axis=1)
    read_in = tf.where(start, initial, before)
    final = tf.gather(after_active, counts, batch_dims=1)
    return read_in, final


def mode_ids(tables: modes.PolicyTables, states):
    """Mode id of each state id (INVALID_MODE for the invalid state), as a tf gather."""
    return tf.gather(tf.constant(modes.mode_of_states(
        tables, np.arange(tables.num_states + 1))), states)
