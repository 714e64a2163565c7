"""The mode guarantee, tried as a hostile user would, through the public sampling API.

Random valid policies x adversarial logits (shifted by +-1e9, all equal, +-inf, NaN rows and
entries, huge spreads, the special ids made likeliest) x temperatures from the smallest to
the largest accepted x top-k/top-p on and off x batches of rows starting in mixed policy
states: no token the policy forbids, never `pad`/`unk`/an id beyond the vocabulary, and the
decoded text re-parses to exactly the sampled tags. Then the same through `Sampler` with
random models whose weights are scaled up to extreme logits.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import piece_classes

from prealign_jax import model as model_lib, modes, partitioning, sampling, tags, vocab

TEMPERATURES = (0.0, sampling.MIN_TEMPERATURE, 1e-3, 0.7, 1.0, 50.0, sampling.MAX_TEMPERATURE)
FILTERS = ((0, 1.0), (1, 1.0), (5, 0.9), (0, 0.5), (40, 0.99))
MODEL_PADDING = 8  # model ids beyond the vocabulary (PAD class: never legal)
ADVERSARIES = 14


def adversarial_logits(kind, key, vocab_size, special):
    """Logits [B, V] for rows of adversary `kind[B]`; softmax-equivalent shifts included."""
    normal = 3 * jax.random.normal(key, (kind.shape[0], vocab_size))
    coin = jax.random.uniform(jax.random.fold_in(key, 1), normal.shape)
    is_special = jnp.isin(jnp.arange(vocab_size), special)[None]
    inf = jnp.inf
    options = [
        normal,
        normal - 1e9,  # every forbidden token likelier than any -1e7 mask value
        normal + 1e9,
        jnp.zeros_like(normal),
        jnp.full_like(normal, -1e30),
        jnp.where(coin < 0.1, inf, normal),
        jnp.where(coin < 0.5, -inf, normal),
        jnp.full_like(normal, jnp.nan),
        jnp.where(coin < 0.3, jnp.nan, normal),
        jnp.where(is_special, 1e9, normal),
        jnp.where(is_special, inf, normal),
        jnp.full_like(normal, -inf),
        normal * 1e30,
        jnp.full_like(normal, inf),
    ]
    assert len(options) == ADVERSARIES
    return jnp.select([kind[:, None] == i for i in range(ADVERSARIES)], options)


def make_step_fn(vocab_size, special):
    """A `sampling.StepFn` whose 'model' is an adversary per row; params = (kind[B], key)."""

    def step_fn(params, cache, tokens, positions, segments):
        kind, key = params
        key = jax.random.fold_in(key, positions[0, -1] * 7919 + tokens[0, -1])
        logits = adversarial_logits(kind, key, vocab_size, special)
        return jnp.broadcast_to(logits[:, None], tokens.shape + (vocab_size,)), cache

    return step_fn


@pytest.fixture(scope="module")
def token_class(spm_vocab):
    return np.concatenate([vocab.token_classes(spm_vocab),
                           np.full(MODEL_PADDING, modes.PAD_CLASS, np.int32)])


def random_policy(rng):
    """A random valid sub-policy of the grammar (a random subset of its transitions)."""
    transitions = modes.GRAMMAR.transitions
    while True:
        chosen = tuple(t for t in transitions if rng.random() < 0.6)
        policy = modes.Policy(f"random{rng.integers(10**6)}", chosen)
        try:
            policy.compile()
            return policy
        except modes.PolicyError:
            continue


def check_rows(spm_vocab, token_class, tables, out, start, use_mask):
    """Asserts the guarantee on every row of a `SampleOutput`; returns tokens checked."""
    checked = 0
    never = set(sampling.NEVER_SAMPLED)
    for r in range(len(start)):
        n = int(out.lengths[r])
        toks = np.asarray(out.tokens[r, :n])
        classes = token_class[toks]
        checked += n
        assert n >= 1 and not never & set(toks.tolist()), toks
        assert (classes != modes.PAD_CLASS).all(), toks
        assert np.isfinite(out.log_probs[r, :n]).all() and (out.log_probs[r, :n] <= 1e-5).all()
        assert vocab.EOS_ID not in toks[:-1].tolist()
        mode_ids, _, final = modes.run_numpy(tables, classes[None], start=[start[r]])
        if use_mask:
            assert modes.first_violation(tables, classes, int(start[r])) is None, (
                tables.states[start[r]], toks)
            np.testing.assert_array_equal(np.asarray(out.mode_ids[r, :n]), mode_ids[0])
            assert int(out.final_state[r]) == final[0]
        text = vocab.decode_tagged(spm_vocab, toks)
        assert tags.token_classes(text).tolist() == piece_classes(
            classes[classes != modes.EOS_CLASS])
    return checked


def test_no_forbidden_token_for_any_logits_or_temperature(spm_vocab, token_class):
    """>= 50,000 sampled tokens; every combination of temperature x filter appears."""
    rng = np.random.default_rng(0)
    vocab_size = len(token_class)
    special = jnp.array([i for i, c in enumerate(token_class) if c != modes.TEXT]
                        + [vocab.UNK_ID])
    step_fn = make_step_fn(vocab_size, special)
    batch, checked, masked_off = 112, 0, 0
    for i, (temperature, (top_k, top_p)) in enumerate(itertools.product(TEMPERATURES,
                                                                          FILTERS)):
        policy = random_policy(rng)
        tables = policy.compile()
        mask = sampling.mask_tables(policy, token_class)
        reachable = modes.reachable_states(tables)
        start = rng.choice(reachable, batch).astype(np.int32)
        kind = np.arange(batch, dtype=np.int32) % ADVERSARIES
        use_mask = i % 9 != 8  # a few runs with the mask off: never pad/unk even then
        cfg = sampling.SamplingConfig(max_new_tokens=40, temperature=temperature,
                                      top_k=top_k, top_p=top_p)
        run = jax.jit(lambda params, tables, start, key, use_mask, cfg=cfg: sampling.decode(
            step_fn, params, jnp.zeros(()), jnp.zeros((batch, 1), jnp.int32),
            jnp.ones((batch,), jnp.int32), start, modes.VocabTables(*tables), key,
            use_mask, cfg=cfg))
        out = jax.tree.map(np.asarray, run(
            (kind, jax.random.key(i)), tuple(mask), start, sampling.sampling_key(i),
            jnp.asarray(use_mask)))
        n = check_rows(spm_vocab, token_class, tables, out, start, use_mask)
        checked += n if use_mask else 0
        masked_off += 0 if use_mask else n
    assert checked >= 50_000, checked
    assert masked_off > 0


def test_degenerate_rows_have_a_defined_result():
    """All allowed logits -inf/NaN: uniform over the allowed ids; +inf ones: shared evenly
    among them; otherwise the allowed maximum is 0, and forbidden ids are exactly -inf."""
    allowed = jnp.array([[False, True, True, False]] * 4)
    inf, nan = jnp.inf, jnp.nan
    logits = jnp.array([[9.0, -inf, nan, 9.0], [inf, inf, 2.0, inf], [1.0, 3e38, -3e38, 7.0],
                        [nan, nan, nan, nan]])
    for t in (0.0, sampling.MIN_TEMPERATURE, sampling.MAX_TEMPERATURE):
        x = np.asarray(sampling.sampling_logits(logits, allowed,
                                                sampling.SamplingConfig(temperature=t)))
        assert np.isneginf(x[:, [0, 3]]).all()
        assert x[0, 1] == x[0, 2] == 0 and x[3, 1] == x[3, 2] == 0  # uniform
        assert x[1, 1] == 0 and np.isneginf(x[1, 2])  # the certain token
        assert x[2, 1] == 0 and x[2, 2] < 0 and not np.isnan(x).any()


def test_top_k_and_top_p_rank_allowed_tokens_only():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    everything = jnp.ones((1, 4), bool)
    keep = lambda x: (np.asarray(x[0]) > -np.inf).tolist()
    assert keep(sampling.sampling_logits(logits, everything, sampling.SamplingConfig(
        top_p=0.7))) == [True, True, False, False]
    assert keep(sampling.sampling_logits(logits, everything, sampling.SamplingConfig(
        top_k=1))) == [True, False, False, False]
    # The likeliest token forbidden: top-k 1 keeps the likeliest *allowed* one.
    allowed = jnp.array([[False, True, True, True]])
    assert keep(sampling.sampling_logits(logits, allowed, sampling.SamplingConfig(
        top_k=1))) == [False, True, False, False]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=float("inf")), "temperature=inf: must be a finite number"),
    (dict(temperature=float("nan")), "temperature=nan: must be a finite number"),
    (dict(temperature=1e-9), "must be 0 (greedy) or in [1e-06, 1e+06]"),
    (dict(temperature=1e7), "must be 0 (greedy) or in [1e-06, 1e+06]"),
    (dict(temperature=-1.0), "must be 0 (greedy) or in"),
    (dict(top_p=float("nan")), "top_p=nan: must be a finite number"),
    (dict(top_p=0.0), "top_p=0.0: must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1: must be >= 0"),
    (dict(top_k=2.5), "top_k=2.5: must be a finite number"),
    (dict(max_new_tokens=0), "max_new_tokens=0: must be >= 1"),
])
def test_sampling_settings_are_validated(kwargs, needle):
    with pytest.raises(sampling.SamplingError) as e:
        sampling.SamplingConfig(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def walk_prompt(rng, tables, steps):
    """Tagged text of a random walk through `tables` from the initial state (no EOS): a raw
    prompt that leaves the row in a random reachable state."""
    state, text = tables.initial, ""
    for _ in range(steps):
        moves = [c for c in range(modes.NUM_CLASSES)
                 if tables.delta[state, c] >= 0 and c != modes.EOS_CLASS]
        if not moves:
            break
        c = int(rng.choice(moves))
        text += tags.escape(" a <ai> b") if c == modes.TEXT else modes.CLASSES[c]
        state = int(tables.delta[state, c])
    return text


@pytest.mark.parametrize("scale, temperature, top_k, top_p", [
    (30.0, sampling.MAX_TEMPERATURE, 0, 1.0), (30.0, sampling.MIN_TEMPERATURE, 0, 1.0),
    (1e4, 1.0, 5, 0.9), (1.0, 0.0, 0, 1.0)])
def test_random_models_through_the_sampler(spm_vocab, token_class, scale, temperature, top_k,
                                           top_p):
    """Random models (weights x `scale`: extreme logits) and random policies through the
    public `Sampler`, rows starting in mixed states: every sample keeps its policy and its
    text re-parses, from its prompt, to the states the sampler reports."""
    rng = np.random.default_rng(int(scale) + top_k)
    cfg = model_lib.ModelConfig(vocab_size=len(token_class), d_model=32, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=None, mlp_dim=64,
                                max_len=96)
    params = nn.unbox(model_lib.Decoder(cfg).init(
        jax.random.key(int(scale)), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"])
    params = jax.tree.map(lambda p: np.asarray(p) * scale ** 0.25, params)
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    checked = 0
    for _ in range(2):
        policy = random_policy(rng)
        tables = policy.compile()
        sampler = sampling.Sampler(cfg, params, spm_vocab, policy, mesh, sampling.SamplingConfig(
            max_new_tokens=32, temperature=temperature, top_k=top_k, top_p=top_p))
        prompts = [sampling.make_prompt(walk_prompt(rng, tables, int(rng.integers(0, 6))),
                                        spm_vocab, policy, raw=True) for _ in range(16)]
        for p, s in zip(prompts, sampler.generate(prompts, seed=int(rng.integers(100)))):
            classes = token_class[list(s.tokens)]
            checked += len(s.tokens)
            assert modes.first_violation(tables, classes, p.state) is None
            assert not set(sampling.NEVER_SAMPLED) & set(s.tokens)
            assert tags.prefix_state(p.text + s.text, policy) == tables.states.index(
                s.final_state)
            if s.ended:
                tags.validate(p.text + s.text, policy)
    assert checked > 0


def test_per_row_settings_keep_the_guarantee(token_class):
    """The serving engine's path: every row its own temperature, top-k and top-p (traced
    `RowSettings`), over every adversary: forbidden ids are exactly -inf, every row keeps an
    allowed id, and the per-row draw lands on an allowed id."""
    rng = np.random.default_rng(1)
    vocab_size = len(token_class)
    special = jnp.array([i for i, c in enumerate(token_class) if c != modes.TEXT])
    settings = list(itertools.product(TEMPERATURES, FILTERS))
    batch = len(settings) * 4
    t, k, p = (np.array([s[0] for s in settings] * 4, np.float32),
               np.array([s[1][0] for s in settings] * 4, np.int32),
               np.array([s[1][1] for s in settings] * 4, np.float32))
    run = jax.jit(lambda logits, allowed, t, k, p, keys: (
        lambda x: (x, sampling.draw(x, t, keys)))(sampling.sampling_logits(
            logits, allowed, sampling.RowSettings(t, k, p))))
    for i in range(3 * ADVERSARIES):
        kind = (np.arange(batch) + i) % ADVERSARIES
        logits = adversarial_logits(jnp.asarray(kind), jax.random.key(i), vocab_size, special)
        allowed = rng.random((batch, vocab_size)) < rng.uniform(0.01, 0.5, (batch, 1))
        allowed[np.arange(batch), rng.integers(0, vocab_size, batch)] = True
        keys = jax.vmap(jax.random.key)(jnp.arange(batch) + i * batch)
        x, tokens = map(np.asarray, run(logits, jnp.asarray(allowed), t, k, p, keys))
        assert np.isneginf(x[~allowed]).all()
        assert (np.isfinite(x) & allowed).any(axis=1).all()
        assert allowed[np.arange(batch), tokens].all()
