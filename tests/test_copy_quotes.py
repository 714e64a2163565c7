"""Faithful quoting (`SamplingConfig.copy_quotes`): inside a quote only a copy of the user's
turn, `<redacted/>` skipping some of it, or the policy's tags — whatever the logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_decoder
from test_mode_guarantee import ADVERSARIES, MODEL_PADDING, make_step_fn

from prealign_jax import modes, partitioning, sampling, tags, vocab
from prealign_jax.evaluation import judging

REDACTED = "<redacted/>"
TURN = "Sam kept the wallet he found at the station and told Ana it was his own"


@pytest.fixture(scope="module")
def token_class(spm_vocab):
    return np.concatenate([vocab.token_classes(spm_vocab),
                           np.full(MODEL_PADDING, modes.PAD_CLASS, np.int32)])


def token_copy_pattern(quote: list[int], redaction: int) -> str:
    """A regex over ' id id ...' of the source that matches iff `quote`'s text tokens are
    contiguous copies in order, each run of k redactions skipping at least k tokens (an
    independent statement of the constraint: a redaction before the first copy skips
    from the start; trailing ones constrain nothing)."""
    pieces, skips, run = [], [0], []
    for t in quote:
        if t == redaction:
            if run:
                pieces.append(run)
                skips.append(0)
                run = []
            skips[-1] += 1
        else:
            run.append(t)
    if run:
        pieces.append(run)
    if not pieces:
        return ""  # redactions alone: nothing was copied
    pattern = "^" + (f"(?: \\d+){{{skips[0]},}}" if skips[0] else "(?: \\d+)*?")
    for i, piece in enumerate(pieces):
        if i:
            pattern += f"(?: \\d+){{{skips[i]},}}"
        pattern += "".join(f" {t}" for t in piece)
    return pattern + "(?: |$)"


def quotes_of(tokens, token_class, start_state, tables):
    """The token runs read inside quotes (text and redactions) of a row."""
    mode_ids, _, _ = modes.run_numpy(tables, token_class[np.asarray(tokens)][None],
                                     start=[start_state])
    quote = modes.MODES.index("quote")
    runs, current = [], None
    for t, m in zip(tokens, mode_ids[0]):
        c = token_class[t]
        if m == quote and c in (modes.TEXT, modes.TAG_CLASS[REDACTED]):
            current = [] if current is None else current
            current.append(int(t))
        elif current is not None and c == modes.TAG_CLASS["</quote>"]:
            runs.append(current)
            current = None
    return runs + ([current] if current else [])


def test_quotes_copy_the_source_under_adversarial_logits(spm_vocab, token_class):
    """Every adversary of the mode-guarantee test, rows starting inside a quote or in the
    assistant's span, each row with its own source: every quote is a token copy, and the
    policy still holds."""
    policy = modes.ASSISTANT.compile()
    mask = sampling.mask_tables(modes.ASSISTANT, token_class)
    special = jnp.array([i for i, c in enumerate(token_class) if c != modes.TEXT]
                        + [vocab.UNK_ID])
    step_fn = make_step_fn(len(token_class), special)
    rng = np.random.default_rng(0)
    texts = np.flatnonzero(token_class == modes.TEXT)
    texts = texts[~np.isin(texts, sampling.NEVER_SAMPLED)]
    batch, width = 2 * ADVERSARIES, 12
    source = np.full((batch, width), vocab.PAD_ID, np.int32)
    for r in range(batch):  # a few repeated ids, so a copy has several places to go on
        n = rng.integers(0, width + 1)
        source[r, :n] = rng.choice(texts[:20] if r % 2 else texts, n)
    in_quote = tags.prefix_state("<ai><quote>", modes.ASSISTANT)
    in_ai = tags.prefix_state("<ai>", modes.ASSISTANT)
    start = np.where(np.arange(batch) % 3 == 0, in_ai, in_quote).astype(np.int32)
    redaction = vocab.tag_ids(spm_vocab)[REDACTED]
    copy = sampling.CopyTables(source, token_class == modes.TEXT,
                               token_class == modes.TAG_CLASS[REDACTED])
    quotes = copied = 0
    for temperature in (0.0, 50.0):
        cfg = sampling.SamplingConfig(max_new_tokens=48, temperature=temperature, top_p=1.0)
        out = jax.tree.map(np.asarray, jax.jit(
            lambda params, tables, copy, key, cfg=cfg: sampling.decode(
                step_fn, params, jnp.zeros(()), jnp.zeros((batch, 1), jnp.int32),
                jnp.ones((batch,), jnp.int32), start, modes.VocabTables(*tables), key,
                jnp.asarray(True), cfg=cfg, copy=sampling.CopyTables(*copy)))(
            (np.arange(batch, dtype=np.int32) % ADVERSARIES, jax.random.key(1)),
            tuple(mask), tuple(copy), sampling.sampling_key(int(temperature))))
        for r in range(batch):
            toks = out.tokens[r, :out.lengths[r]]
            assert modes.first_violation(policy, token_class[toks], int(start[r])) is None
            line = "".join(f" {t}" for t in source[r] if t != vocab.PAD_ID)
            for q in quotes_of(toks, token_class, int(start[r]), policy):
                quotes += 1
                copied += any(t != redaction for t in q)
                assert re.search(token_copy_pattern(q, redaction), line), (q, line)
    assert quotes >= 20 and copied >= 10, (quotes, copied)


@pytest.fixture(scope="module")
def model(spm_vocab):
    return random_decoder(spm_vocab.vocab_size, max_len=128)


def sample_quotes(model, spm_vocab, copy_quotes):
    cfg, params = model
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    sampler = sampling.Sampler(cfg, params, spm_vocab, "assistant", mesh,
                               sampling.SamplingConfig(max_new_tokens=40, temperature=1.0,
                                                       top_p=1.0, copy_quotes=copy_quotes))
    opened = "<ai>I got this request: <quote>"  # the policy's document; the turn is context
    text = sampling.make_prompt(TURN, spm_vocab, "assistant", mode="ai").text[:-4] + opened
    prompt = sampling.Prompt(text, tuple(spm_vocab.encode(text)),
                             tags.prefix_state(opened, "assistant"))
    samples = sampler.generate([prompt] * 32, seed=3)
    # the prompt opened the first quote: read from its tag on
    return [q for s in samples for q in judging.quotes("<quote>" + s.text, s.prompt)]


def test_sampled_quotes_decode_to_the_users_words(model, spm_vocab):
    """Through `Sampler` with a random model: with the option every quote is judged
    faithful (`tags.is_copy` on the decoded text); without it, quotes are not."""
    on = sample_quotes(model, spm_vocab, True)
    assert len(on) >= 32 and all(faithful for _, faithful in on), on
    assert sum(len(text.split()) for text, _ in on) >= 64  # words were copied, not only redacted
    off = sample_quotes(model, spm_vocab, False)
    assert sum(faithful for _, faithful in off) < len(off) / 2


def test_copy_source_is_the_users_turn(spm_vocab, token_class):
    prompt = sampling.make_prompt(TURN + " <human>", spm_vocab, "assistant", mode="ai")
    ids = sampling.copy_source(prompt.ids, token_class)
    assert spm_vocab.decode([int(i) for i in ids]).strip() == tags.escape(TURN + " <human>")
    assert sampling.copy_source(sampling.make_prompt("", spm_vocab, "assistant",
                                                     mode="ai").ids, token_class).size == 0


def test_copy_quotes_must_be_a_bool():
    with pytest.raises(sampling.SamplingError, match="copy_quotes='yes'"):
        sampling.SamplingConfig(copy_quotes="yes")
