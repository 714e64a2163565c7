"""The mode grammar: policies, compiled tables, and the numpy/jnp FSM runners."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prealign_jax import modes

GRAMMAR = modes.GRAMMAR.compile()
NON_PAD = [c for c in range(modes.NUM_CLASSES) if c != modes.PAD_CLASS]


def reference_well_formed(classes):
    """An independent oracle: a stack recognizer written from DESIGN.md's prose."""
    opens = {modes.TAG_CLASS["<human>"]: "human", modes.TAG_CLASS["<ai>"]: "ai",
             modes.TAG_CLASS["<quote>"]: "quote"}
    closes = {modes.TAG_CLASS["</human>"]: "human", modes.TAG_CLASS["</ai>"]: "ai",
              modes.TAG_CLASS["</quote>"]: "quote"}
    stack = []
    for c in classes:
        if c == modes.TEXT:
            continue
        if c == modes.EOS_CLASS:
            if stack:
                return False
        elif c == modes.TAG_CLASS["<redacted/>"]:
            if stack[-1:] != ["quote"]:
                return False
        elif c in opens:
            want_parent = ["ai"] if opens[c] == "quote" else []
            if stack != want_parent:
                return False
            stack.append(opens[c])
        elif c in closes:
            if stack[-1:] != [closes[c]]:
                return False
            stack.pop()
        else:
            return False
    return not stack


def random_walk(tables, rng, length):
    """A stream sampled uniformly among the allowed classes (what a masked sampler does)."""
    state, out = tables.initial, []
    for _ in range(length):
        choices = np.flatnonzero(tables.delta[state] >= 0)
        c = int(rng.choice(choices))
        out.append(c)
        state = tables.delta[state, c]
    return out, state


@pytest.mark.parametrize("name", sorted(modes.POLICIES))
def test_builtin_policies_compile_and_describe(name):
    tables = modes.get_policy(name).compile()
    assert tables.delta.shape == (tables.num_states, modes.NUM_CLASSES)
    assert (tables.delta[:, modes.PAD_CLASS] < 0).all()
    assert name in tables.describe()


def test_assistant_policy_forbids_human_and_ends_after_ai():
    t = modes.ASSISTANT.compile()
    for s in range(t.num_states):
        assert t.delta[s, modes.TAG_CLASS["<human>"]] < 0
    ai = t.delta[t.initial, modes.TAG_CLASS["<ai>"]]
    closed = t.delta[ai, modes.TAG_CLASS["</ai>"]]
    assert t.allowed_classes(closed) == ["eos"]
    assert modes.MODES[t.state_mode[closed]] == "doc"


def test_human_only_never_reaches_ai_mode():
    t = modes.HUMAN_ONLY.compile()
    assert set(modes.MODES[m] for m in t.state_mode) == {"doc", "human"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(NON_PAD), max_size=30))
def test_accepts_iff_well_formed(classes):
    assert modes.is_well_formed(GRAMMAR, classes) == reference_well_formed(classes + [modes.EOS_CLASS])


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(sorted(modes.POLICIES)), st.integers(0, 2**32 - 1), st.integers(1, 60))
def test_masked_random_walks_stay_well_formed(name, seed, length):
    tables = modes.get_policy(name).compile()
    classes, state = random_walk(tables, np.random.default_rng(seed), length)
    assert modes.first_violation(tables, classes) is None
    assert modes.first_violation(GRAMMAR, classes) is None  # every policy is inside the grammar
    # Up to the first EOS, the prefix is well-formed once closed off.
    if modes.EOS_CLASS in classes:
        assert reference_well_formed(classes[:classes.index(modes.EOS_CLASS) + 1])


@st.composite
def packed_batch(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 24))
    classes = draw(st.lists(st.lists(st.sampled_from(NON_PAD), min_size=t, max_size=t),
                            min_size=b, max_size=b))
    segs = []
    for _ in range(b):
        cuts = sorted(draw(st.lists(st.integers(0, t), max_size=3)))
        pad = draw(st.integers(0, t // 2))
        row = np.searchsorted(cuts, np.arange(t), side="right") + 1
        row[t - pad:] = 0
        segs.append(row)
    return np.array(classes, np.int32), np.array(segs, np.int32)


_run_jax_jit = jax.jit(lambda c, s: modes.run_jax(GRAMMAR, c, s))


@settings(max_examples=100, deadline=None)
@given(packed_batch())
def test_numpy_and_jax_runners_agree(batch):
    classes, segs = batch
    np_out = modes.run_numpy(GRAMMAR, classes, segs)
    jax_out = _run_jax_jit(classes, segs)
    for a, b in zip(np_out, jax_out):
        np.testing.assert_array_equal(a, np.asarray(b))


_run_jax_from = jax.jit(lambda c, s, start: modes.run_jax(GRAMMAR, c, s, start))


@settings(max_examples=100, deadline=None)
@given(packed_batch(), st.data())
def test_runners_continue_from_start_and_agree(batch, data):
    """Row b reads its first segment from `start[b]` (as after a prompt), then resets at
    each new segment; both runners agree, and stepping the table by hand gives the same."""
    classes, segs = batch
    start = np.array(data.draw(st.lists(st.integers(0, GRAMMAR.num_states),
                                        min_size=len(classes), max_size=len(classes))),
                     np.int32)
    np_out = modes.run_numpy(GRAMMAR, classes, segs, start)
    for a, b in zip(np_out, _run_jax_from(classes, segs, start)):
        np.testing.assert_array_equal(a, np.asarray(b))
    table = modes.transition_table(GRAMMAR)
    for r in range(len(classes)):
        state, prev = start[r], segs[r, 0]
        for i, (c, seg) in enumerate(zip(classes[r], segs[r])):
            if seg != prev and seg != 0:
                state = GRAMMAR.initial
            prev = seg
            assert np_out[1][r, i] == state
            state = state if seg == 0 else table[state, c]
        assert np_out[2][r] == state


def test_start_state_is_honoured_under_assistant():
    """The issue's case: from `ai`, text, text, </ai>, eos reads in ai, ai, ai, closed."""
    tables = modes.ASSISTANT.compile()
    ai, closed = tables.states.index("ai"), tables.states.index("closed")
    classes = [[modes.TEXT, modes.TEXT, modes.TAG_CLASS["</ai>"], modes.EOS_CLASS]]
    mode_ids, states, final = modes.run_numpy(tables, classes, start=[ai])
    assert states[0].tolist() == [ai, ai, ai, closed] and final.tolist() == [closed]
    assert [modes.MODES[m] for m in mode_ids[0]] == ["ai", "ai", "ai", "doc"]
    jax_states = modes.run_jax(tables, np.array(classes), start=np.array([ai]))[1]
    assert np.asarray(jax_states).tolist() == states.tolist()


@settings(max_examples=100, deadline=None)
@given(packed_batch())
def test_each_segment_is_read_as_a_fresh_document(batch):
    classes, segs = batch
    modes_ids, states, _ = modes.run_numpy(GRAMMAR, classes, segs)
    for r in range(classes.shape[0]):
        for seg in set(segs[r]) - {0}:
            idx = np.flatnonzero(segs[r] == seg)
            alone, alone_states, _ = modes.run_numpy(GRAMMAR, classes[r:r + 1, idx])
            np.testing.assert_array_equal(modes_ids[r, idx], alone[0])
            np.testing.assert_array_equal(states[r, idx], alone_states[0])


def test_mode_ids_on_a_known_document():
    tc = modes.TAG_CLASS
    doc = [tc["<ai>"], 0, tc["<quote>"], 0, tc["<redacted/>"], tc["</quote>"], 0, tc["</ai>"],
           modes.EOS_CLASS]
    mode_ids, _, final = modes.run_numpy(GRAMMAR, [doc])
    names = [modes.MODES[m] for m in mode_ids[0]]
    assert names == ["doc", "ai", "ai", "quote", "quote", "quote", "ai", "ai", "doc"]
    assert final[0] == GRAMMAR.initial


def test_forbidden_token_goes_to_absorbing_invalid_state_until_segment_ends():
    tc = modes.TAG_CLASS
    classes = np.array([[tc["<human>"], tc["<redacted/>"], 0, tc["</human>"], tc["<ai>"], 0]])
    segs = np.array([[1, 1, 1, 1, 2, 2]])
    mode_ids, _, _ = modes.run_numpy(GRAMMAR, classes, segs)
    assert mode_ids[0].tolist() == [modes.DOC, modes.HUMAN, modes.INVALID_MODE,
                                    modes.INVALID_MODE, modes.DOC, modes.AI]


def test_padding_keeps_the_state():
    tc = modes.TAG_CLASS
    classes = np.array([[tc["<ai>"], modes.PAD_CLASS, modes.PAD_CLASS]])
    _, states, final = modes.run_numpy(GRAMMAR, classes, np.array([[1, 0, 0]]))
    ai = GRAMMAR.states.index("ai")
    assert states[0, 1:].tolist() == [ai, ai] and final[0] == ai


def test_for_vocab_expands_classes():
    token_class = np.array([modes.PAD_CLASS, modes.EOS_CLASS, modes.TEXT,
                            modes.TAG_CLASS["<ai>"], modes.TEXT])
    tables = modes.ASSISTANT.compile()
    vt = tables.for_vocab(token_class, never=(4,))
    invalid = tables.num_states
    assert vt.allowed.shape == (invalid + 1, 5)
    assert vt.allowed[0].tolist() == [False, False, True, True, False]
    forbidden = ~vt.allowed[:invalid]
    forbidden[:, 4] = False  # `never` excludes an id; it does not change transitions
    assert (vt.next_state[:invalid][forbidden] == invalid).all()
    # the invalid state (and the mask switched off): everything but pad and `never`
    assert vt.allowed[invalid].tolist() == [False, True, True, True, False]
    assert vt.state_mode[invalid] == modes.INVALID_MODE


@pytest.mark.parametrize("policy, needle", [
    (modes.Policy("p1", ("doc <ai> -> ai", "ai text -> ai")), "state 'doc'"),
    (modes.Policy("p2", ("doc <human> -> ai",)), "not in the grammar"),
    (modes.Policy("p3", ("doc eos -> doc", "doc <ai> -> ai")), "state 'ai' allows no token"),
    (modes.Policy("p4", ("doc eos doc",)), "STATE CLASS -> STATE"),
    (modes.Policy("p5", ("doc eos -> doc", "doc <ai> -> helper", "helper </ai> -> doc")),
     "state 'helper' is not a mode"),
    (modes.Policy("p6", ("doc eos -> doc", "doc bogus -> doc")), "unknown class 'bogus'"),
    (modes.Policy("p7", ("doc eos -> doc",), state_modes={"x": "robot"}), "unknown modes"),
    (modes.Policy("p8", ("start eos -> start",), initial="start",
                  state_modes={"start": "ai"}), "must be in mode 'doc'"),
])
def test_bad_policies_give_one_line_errors_naming_policy(policy, needle):
    with pytest.raises(modes.PolicyError) as e:
        policy.compile()
    msg = str(e.value)
    assert needle in msg and f"policy {policy.name!r}" in msg and "\n" not in msg


def test_unknown_policy_name_lists_known():
    with pytest.raises(modes.PolicyError, match="known policies"):
        modes.get_policy("asistant")
