"""The mode FSM of `modes.py` run inside a tf.data pipeline, vectorised.

`modes.run_numpy` / `modes.run_jax` step token by token; a tf.data map cannot afford a
per-token loop. Each token's class selects a *function* on states (a column of the same
transition table `modes` builds); the state after token t is the composition of the
functions of tokens 0..t, computed with a parallel prefix (Hillis–Steele) scan in
log2(T) gathers. Same table, same segment semantics (a new non-zero segment id resets to
the initial state, padding leaves it unchanged), no second copy of any rule.
"""

from __future__ import annotations

import numpy as np

from prealign_jax import modes, tf_cpu

tf = tf_cpu.import_tf()


def read_in_states(tables: modes.PolicyTables, classes, segment_ids):
    """State each token is read in, and the state after the last token, for `[..., T]`.

    `classes` are token classes (int32), `segment_ids` as in `modes.run_jax` (0 = padding).
    Returns (read_in[..., T], final[...]) as int32 tensors; the invalid state is S.
    """
    table = modes.transition_table(tables)
    num = table.shape[0]
    initial = tables.initial
    classes = tf.convert_to_tensor(classes, tf.int32)
    seg = tf.convert_to_tensor(segment_ids, tf.int32)
    rank = classes.shape.rank

    column = tf.concat([tf.shape(seg)[:-1], [1]], axis=0)  # shape [..., 1]
    prev = tf.concat([tf.fill(column, -1), seg[..., :-1]], axis=-1)
    start = (seg != prev) & (seg != 0)
    # f[..., t, s]: state after token t when it is read in state s.
    step = tf.gather(tf.constant(table.T), classes)  # [..., T, S+1]
    from_initial = tf.gather(tf.constant(table[initial]), classes)[..., None]
    identity = tf.broadcast_to(tf.range(num, dtype=tf.int32), tf.shape(step))
    f = tf.where(start[..., None], tf.broadcast_to(from_initial, tf.shape(step)), step)
    f = tf.where((seg == 0)[..., None], identity, f)

    length = tf.shape(classes)[-1]

    def compose(k, f):
        # f[t] <- f[t] o f[t-k]  (identity before the start)
        earlier = tf.concat([identity[..., :k, :], f[..., :-k, :]], axis=-2)
        return k * 2, tf.gather(f, earlier, batch_dims=rank)

    static_length = classes.shape[-1]
    if static_length is not None:
        k = 1
        while k < static_length:
            k, f = compose(k, f)
    else:
        _, f = tf.while_loop(lambda k, f: k < length, compose, (tf.constant(1), f),
                             shape_invariants=(tf.TensorShape([]), f.shape))
    after = f[..., initial]
    states = tf.concat([tf.fill(column, initial), after], axis=-1)
    read_in = tf.where(start, initial, states[..., :-1])
    final = states[..., -1]
    return read_in, final


def mode_ids(tables: modes.PolicyTables, states):
    """Mode id of each state id (INVALID_MODE for the invalid state), as a tf gather."""
    return tf.gather(tf.constant(modes.mode_of_states(tables, np.arange(tables.num_states
                                                                        + 1))), states)
