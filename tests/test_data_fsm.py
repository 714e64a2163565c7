"""The vectorised TF FSM agrees with modes.run_numpy, state for state."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prealign_jax import modes
from prealign_jax.data import fsm_tf


def _segments(rng, b, t):
    """Packed-style segment ids: runs 1, 2, ... then padding 0 at the end of each row."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.integers(0, t + 1, size=rng.integers(1, 4)))
        for i, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
            seg[row, lo:hi] = i + 1
    return seg


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 70),
       policy=st.sampled_from(sorted(modes.POLICIES)))
def test_matches_run_numpy(seed, t, policy):
    tables = modes.get_policy(policy).compile()
    rng = np.random.default_rng(seed)
    # mostly text, some tags / eos: long runs of identity tokens, like real documents
    classes = np.where(rng.random((5, t)) < 0.7, modes.TEXT,
                       rng.integers(0, modes.NUM_CLASSES - 1, (5, t))).astype(np.int32)
    seg = _segments(rng, 5, t)
    _, states, final = modes.run_numpy(tables, classes, seg)
    read_in, tf_final = fsm_tf.read_in_states(tables, classes, seg)
    np.testing.assert_array_equal(read_in.numpy(), states)
    # final state agrees where the row ends in a real token (run_numpy's last state)
    np.testing.assert_array_equal(tf_final.numpy(), final)
    rows1, final1 = fsm_tf.read_in_states(tables, classes[0], seg[0])
    np.testing.assert_array_equal(rows1.numpy(), states[0])
    assert int(final1) == final[0]


def test_empty_and_mode_ids():
    tables = modes.GRAMMAR.compile()
    read_in, final = fsm_tf.read_in_states(tables, np.zeros((2, 0), np.int32),
                                           np.zeros((2, 0), np.int32))
    assert read_in.shape == (2, 0) and list(final.numpy()) == [tables.initial] * 2
    ids = fsm_tf.mode_ids(tables, np.arange(tables.num_states + 1)).numpy()
    assert list(ids) == list(modes.mode_of_states(tables, np.arange(tables.num_states + 1)))
    assert ids[-1] == modes.INVALID_MODE


@pytest.mark.parametrize("tag_seq, expect_invalid", [
    (["<human>", "text", "</human>"], False),
    (["<ai>", "<quote>", "<redacted/>", "</quote>", "</ai>"], False),
    (["<human>", "<quote>"], True),  # quote only inside ai
    (["</ai>"], True),
])
def test_invalid_state_is_absorbing(tag_seq, expect_invalid):
    tables = modes.GRAMMAR.compile()
    classes = np.array([[modes.CLASSES.index(c) for c in tag_seq] + [modes.TEXT]], np.int32)
    read_in, _ = fsm_tf.read_in_states(tables, classes, np.ones_like(classes))
    assert (read_in.numpy()[0, -1] == tables.num_states) == expect_invalid
