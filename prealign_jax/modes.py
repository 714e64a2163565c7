"""The mode grammar, defined once: states, tags, policies and their compiled FSM tables.

Everything that needs to know which tag may follow which — data validation (`tags.py`),
per-mode metric groups (`GROUPS`, trainer and evaluation), the decode-time transition mask (`sampling.py`) —
reads the tables built here. No other module spells out a transition rule.

Vocabulary-independent layer: every token falls in one *token class* (ordinary text, one of
the seven tags, EOS, PAD). A policy is a small automaton over named states, each state
labelled with the grammar *mode* it lives in; its transition table `delta[S, C]` maps
(state, class) to the next state, or -1 where the class is forbidden. Compiling a policy
for a vocabulary adds `token_class[V]`, which gives `allowed[S, V]` and `next_state[S, V]`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from prealign_jax.errors import UserError

# ---------------------------------------------------------------- modes, tags, classes
MODES = ("doc", "human", "ai", "quote")
DOC, HUMAN, AI, QUOTE = range(len(MODES))
INVALID_MODE = -1  # mode id of a token read after a forbidden transition

TAGS = ("<human>", "</human>", "<ai>", "</ai>", "<quote>", "</quote>", "<redacted/>")

# Token classes: column order of `delta`. TEXT is every ordinary token.
CLASSES = ("text",) + TAGS + ("eos", "pad")
TEXT = 0
TAG_CLASS = {tag: i + 1 for i, tag in enumerate(TAGS)}
EOS_CLASS = len(TAGS) + 1
PAD_CLASS = len(TAGS) + 2
NUM_CLASSES = len(CLASSES)

# The grammar: mode -> {class name: next mode}. PAD is never a legal token.
_GRAMMAR: dict[str, dict[str, str]] = {
    "doc": {"text": "doc", "<human>": "human", "<ai>": "ai", "eos": "doc"},
    "human": {"text": "human", "</human>": "doc"},
    "ai": {"text": "ai", "<quote>": "quote", "</ai>": "doc"},
    "quote": {"text": "quote", "<redacted/>": "quote", "</quote>": "ai"},
}


class PolicyError(UserError):
    """A policy that is not a well-formed subset of the grammar (names the policy and state)."""


# ---------------------------------------------------------------- policies
_TRANSITION_RE = re.compile(r"^\s*(\S+)\s+(\S+)\s*->\s*(\S+)\s*$")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A named sub-automaton of the grammar, as written in gin or code.

    Attributes:
      name: shown in every error and log line.
      transitions: strings `"STATE CLASS -> STATE"`, CLASS being `text`, `eos` or a tag,
        e.g. `"ai </ai> -> closed"`.
      state_modes: mode of each state whose name is not itself a mode (e.g. `closed: doc`).
      initial: the state a fresh document (or packed segment) starts in.
    """

    name: str
    transitions: tuple[str, ...]
    state_modes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    initial: str = "doc"

    def compile(self) -> "PolicyTables":
        """Validated tables (cached: policies are small and compiled often)."""
        key = (self.name, tuple(self.transitions), tuple(sorted(self.state_modes.items())),
               self.initial)
        if key not in _COMPILED:
            _COMPILED[key] = _compile(self)
        return _COMPILED[key]


_COMPILED: dict[tuple, "PolicyTables"] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyTables:
    """A validated policy as dense tables over states and token classes.

    `delta[s, c]` is the next state or -1 (forbidden); `state_mode[s]` the mode id of state s.
    """

    name: str
    states: tuple[str, ...]
    state_mode: np.ndarray  # [S] int32
    delta: np.ndarray  # [S, C] int32
    initial: int

    @property
    def num_states(self) -> int:
        return len(self.states)

    def allowed_classes(self, state: int) -> list[str]:
        return [CLASSES[c] for c in np.flatnonzero(self.delta[state] >= 0)]

    def for_vocab(self, token_class: np.ndarray, never: Sequence[int] = ()) -> "VocabTables":
        """The tables over a vocabulary's ids (`token_class[V]`); ids in `never` are allowed
        in no state (the sampler's pad and unk)."""
        token_class = np.asarray(token_class, np.int32)
        next_state = transition_table(self)[:, token_class]
        allowed = np.concatenate([self.delta[:, token_class] >= 0,
                                  (token_class != PAD_CLASS)[None]])
        allowed[:, list(never)] = False
        empty = [self.states[s] for s in reachable_states(self) if not allowed[s].any()]
        if empty:
            raise PolicyError(f"policy {self.name!r}: no id of this vocabulary is allowed in "
                              f"state(s) {empty}; use the run's own vocabulary")
        return VocabTables(allowed, next_state, np.append(self.state_mode, INVALID_MODE))

    def describe(self) -> str:
        """The table as text: one row per state, the allowed classes and their targets."""
        rows = [f"policy {self.name!r} (initial state {self.states[self.initial]!r})"]
        for s, state in enumerate(self.states):
            moves = ", ".join(f"{CLASSES[c]}->{self.states[t]}"
                              for c, t in enumerate(self.delta[s]) if t >= 0)
            rows.append(f"  {state:<10} [{MODES[self.state_mode[s]]:<5}] {moves}")
        return "\n".join(rows)


class VocabTables(NamedTuple):
    """A policy compiled for one vocabulary, with the absorbing invalid state S appended:
    the static arrays the jitted sampler reads (a pytree). Forbidden ids lead to S; row S,
    reached only with the mask off, is also the row read when the mask is off: every id but
    PAD-class ones and the `never` ids of `for_vocab`."""

    allowed: Any  # [S+1, V] bool
    next_state: Any  # [S+1, V] int32
    state_mode: Any  # [S+1] int32: mode id of each state (INVALID_MODE for S)


def _compile(policy: Policy) -> PolicyTables:
    where = f"policy {policy.name!r}"
    parsed = []
    for line in policy.transitions:
        m = _TRANSITION_RE.match(line)
        if not m:
            raise PolicyError(f"{where}: transition {line!r} is not 'STATE CLASS -> STATE'")
        parsed.append(m.groups())

    states: list[str] = [policy.initial]
    for src, _, dst in parsed:
        for s in (src, dst):
            if s not in states:
                states.append(s)
    unknown_modes = {s: m for s, m in policy.state_modes.items() if m not in MODES}
    if unknown_modes:
        raise PolicyError(f"{where}: state_modes {unknown_modes} name unknown modes; "
                          f"modes are {MODES}")
    mode_of = {}
    for s in states:
        mode = policy.state_modes.get(s, s)
        if mode not in MODES:
            raise PolicyError(f"{where}: state {s!r} is not a mode; give its mode in "
                              f"state_modes (one of {MODES})")
        mode_of[s] = mode
    if mode_of[policy.initial] != "doc":
        raise PolicyError(f"{where}: initial state {policy.initial!r} must be in mode 'doc'")

    index = {s: i for i, s in enumerate(states)}
    delta = np.full((len(states), NUM_CLASSES), -1, np.int32)
    for (src, cls, dst), line in zip(parsed, policy.transitions):
        if cls not in CLASSES or cls == "pad":
            raise PolicyError(f"{where}: {line!r}: unknown class {cls!r}; use text, eos or "
                              f"one of {TAGS}")
        grammar_next = _GRAMMAR[mode_of[src]].get(cls)
        if grammar_next != mode_of[dst]:
            raise PolicyError(
                f"{where}: {line!r} is not in the grammar: in mode {mode_of[src]!r}, "
                f"{cls} " + ("is forbidden" if grammar_next is None
                             else f"leads to mode {grammar_next!r}, not {mode_of[dst]!r}"))
        c = CLASSES.index(cls)
        if delta[index[src], c] not in (-1, index[dst]):
            raise PolicyError(f"{where}: state {src!r} has two transitions on {cls}")
        delta[index[src], c] = index[dst]

    tables = PolicyTables(name=policy.name, states=tuple(states),
                          state_mode=np.array([MODES.index(mode_of[s]) for s in states],
                                              np.int32),
                          delta=delta, initial=index[policy.initial])
    _validate(tables)
    return tables


def reachable_states(tables: PolicyTables) -> list[int]:
    """The states a document under `tables` can be in, sorted."""
    return sorted(_reachable(tables.delta, tables.initial))


def _reachable(delta: np.ndarray, start: int) -> set[int]:
    seen, todo = {start}, [start]
    while todo:
        for t in delta[todo.pop()]:
            if t >= 0 and t not in seen:
                seen.add(int(t))
                todo.append(int(t))
    return seen


def _validate(t: PolicyTables) -> None:
    """Every reachable state must allow some token and be able to reach EOS."""
    where = f"policy {t.name!r}"
    reachable = _reachable(t.delta, t.initial)
    ends = {s for s in range(t.num_states) if t.delta[s, EOS_CLASS] >= 0}
    for s in sorted(reachable):
        if not (t.delta[s] >= 0).any():
            raise PolicyError(f"{where}: state {t.states[s]!r} allows no token; add a "
                              "transition out of it")
        if not (_reachable(t.delta, s) & ends):
            raise PolicyError(f"{where}: from state {t.states[s]!r} no path reaches eos; "
                              "documents there could never end")


# The grammar itself is a policy: states are the modes.
GRAMMAR = Policy(
    name="grammar",
    transitions=tuple(f"{mode} {cls} -> {nxt}"
                      for mode, moves in _GRAMMAR.items() for cls, nxt in moves.items()),
)

# The aligned assistant: ai spans only (quotes inside), human never opens; once the ai span
# closes only EOS follows. Plain text before <ai> is an (escaped) prompt; the user's turn
# that `sampling.make_prompt(mode="ai")` puts first is context, before the policy's document.
ASSISTANT = Policy(
    name="assistant",
    transitions=(
        "doc text -> doc", "doc <ai> -> ai",
        "ai text -> ai", "ai <quote> -> quote", "ai </ai> -> closed",
        "quote text -> quote", "quote <redacted/> -> quote", "quote </quote> -> ai",
        "closed eos -> closed",
    ),
    state_modes={"closed": "doc"},
)

HUMAN_ONLY = Policy(
    name="human_only",
    transitions=("doc text -> doc", "doc <human> -> human", "doc eos -> doc",
                 "human text -> human", "human </human> -> doc"),
)

# The grammar without `<human>`: no human span can ever open. The decoding of the SafeLM
# baseline, whose single harm tag is `<human>` (`data/baselines.py`).
NO_HUMAN = Policy(
    name="no_human",
    transitions=tuple(f"{mode} {cls} -> {nxt}" for mode, moves in _GRAMMAR.items()
                      if mode != "human" for cls, nxt in moves.items() if cls != "<human>"),
)

BUILT_IN = (GRAMMAR, ASSISTANT, HUMAN_ONLY, NO_HUMAN)
# The policy registry: the built-in policies and those registered (e.g. from gin's
# `policies.extra`, gin/policies/*.gin). Every lookup by name goes through `get_policy`.
POLICIES: dict[str, Policy] = {p.name: p for p in BUILT_IN}


def register_policy(policy: Policy) -> None:
    """Add a policy to the registry (validated now); a built-in name cannot be redefined."""
    if any(policy.name == p.name and policy != p for p in BUILT_IN):
        raise PolicyError(f"policy {policy.name!r} is built in; give yours another name")
    policy.compile()
    POLICIES[policy.name] = policy


def get_policy(policy: str | Policy) -> Policy:
    """A policy by name (registered) or as given; unknown names list the known ones."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}; known policies: {sorted(POLICIES)} "
                          "(define more in gin with policies.extra)")
    return POLICIES[policy]


def grammar_tables() -> PolicyTables:
    return GRAMMAR.compile()


# ---------------------------------------------------------------- running the FSM
def transition_table(tables: PolicyTables) -> np.ndarray:
    """`delta` with forbidden moves sent to an absorbing INVALID state (index S)."""
    invalid = tables.num_states
    d = np.where(tables.delta < 0, invalid, tables.delta)
    return np.concatenate([d, np.full((1, NUM_CLASSES), invalid)]).astype(np.int32)


def _fsm_step(xp, table, initial, state, cls, seg, prev_seg):
    """One FSM step for a batch of rows, shared by the numpy and jnp runners.

    Returns (state the token is read in, state after it). A new non-zero segment id resets
    the row to `initial`; padding (segment 0) leaves the state unchanged.
    """
    state = xp.where((seg != prev_seg) & (seg != 0), initial, state)
    return state, xp.where(seg == 0, state, table[state, cls])


def run_numpy(tables: PolicyTables, classes, segment_ids=None, start=None):
    """Run the FSM over `classes[B, T]` in numpy; the same contract as `run_jax`."""
    classes = np.asarray(classes, np.int32)
    seg = np.ones_like(classes) if segment_ids is None else np.asarray(segment_ids, np.int32)
    table = transition_table(tables)
    state = _start_states(tables, classes.shape[0], start, np)
    prev = seg[:, 0] if classes.shape[1] else None  # None: there is no token to read
    read_in = np.empty(classes.shape, np.int32)
    for i in range(classes.shape[1]):
        read_in[:, i], state = _fsm_step(np, table, tables.initial, state, classes[:, i],
                                         seg[:, i], prev)
        prev = seg[:, i]
    return mode_of_states(tables, read_in), read_in, state


def run_jax(tables: PolicyTables, classes, segment_ids=None, start=None):
    """Run the FSM over `classes[B, T]` with `lax.scan`; pure and jit-friendly.

    Returns (mode_ids[B, T], states[B, T], final_state[B]): the mode and state each token is
    *read in* (the state before it, which decided whether it was allowed) and the state after
    the last token. Row b begins in state `start[b]` (default: the initial state), e.g. the
    state a prompt left; the first token continues that document. A later change of segment
    id resets a row to the initial state; segment 0 (padding) leaves it unchanged. A
    forbidden token sends the row to the absorbing invalid state `tables.num_states` (mode
    INVALID_MODE) until its segment ends.
    """
    import jax
    import jax.numpy as jnp

    classes = jnp.asarray(classes, jnp.int32)
    seg = jnp.ones_like(classes) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    table = jnp.asarray(transition_table(tables))

    def body(carry, x):
        state, prev = carry
        read_in, nxt = _fsm_step(jnp, table, tables.initial, state, *x, prev)
        return (nxt, x[1]), read_in

    init = (_start_states(tables, classes.shape[0], start, jnp), seg[:, 0])
    (state, _), read_in = jax.lax.scan(body, init, (classes.T, seg.T))
    read_in = read_in.T
    return mode_of_states(tables, read_in, jnp), read_in, state


def _start_states(tables: PolicyTables, rows: int, start, xp):
    if start is None:
        return xp.full((rows,), tables.initial, xp.int32)
    return xp.broadcast_to(xp.asarray(start, xp.int32), (rows,))


def mode_of_states(tables: PolicyTables, states, xp=np):
    """Mode ids of state ids; the invalid state maps to INVALID_MODE."""
    modes = np.append(tables.state_mode, INVALID_MODE).astype(np.int32)
    return xp.asarray(modes)[states]


def first_violation(tables: PolicyTables, classes: Sequence[int],
                    start: int | None = None) -> int | None:
    """Index of the first forbidden token of one unpacked stream read from state `start`
    (default: the initial state), or None."""
    state = tables.initial if start is None else start
    for i, c in enumerate(classes):
        state = tables.delta[state, c]
        if state < 0:
            return i
    return None


def is_well_formed(tables: PolicyTables, classes: Sequence[int]) -> bool:
    """A complete document: every transition allowed and it ends where EOS is allowed."""
    state = tables.initial
    for c in classes:
        state = tables.delta[state, c]
        if state < 0:
            return False
    return bool(tables.delta[state, EOS_CLASS] >= 0)


# ---------------------------------------------------------------- per-mode metric groups
# What the trainer's per-mode metrics and the held-out evaluation group target tokens by:
# text read in each mode (the first len(MODES) groups), every tag, EOS.
GROUPS = MODES + ("tag", "eos")


def token_groups(targets, segment_ids, token_class):
    """bool [G, B, T]: membership of each target token in `GROUPS` (padding in none), its
    mode read by the grammar over each packed segment; jit-friendly."""
    import jax.numpy as jnp

    classes = jnp.asarray(token_class)[targets]
    mode_ids, _, _ = run_jax(grammar_tables(), classes, segment_ids)
    real = segment_ids != 0
    text = real & (classes == TEXT)
    by_mode = [text & (mode_ids == MODES.index(m)) for m in MODES]
    tag = real & (classes >= 1) & (classes <= len(TAGS))
    eos = real & (classes == EOS_CLASS)
    return jnp.stack(by_mode + [tag, eos])
