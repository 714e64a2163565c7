"""The serving engine: with requests joining and leaving rows (and the cache compacted
under them) it draws exactly what the one-shot sampler draws; seeds, stop tokens, per-row
policies, faithful quotes and cancellation hold."""

import threading

import jax
import pytest

from conftest import random_decoder

from prealign_jax import engine as engine_lib, modes, partitioning
from prealign_jax import sampling, tags, vocab
from prealign_jax.evaluation import judging

WAIT_S = 300  # a deadlock guard, not a performance bound


@pytest.fixture(scope="module")
def setup(spm_vocab):
    return random_decoder(spm_vocab.vocab_size, max_len=64)


@pytest.fixture(scope="module")
def mesh():
    return partitioning.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def engine(setup, spm_vocab, mesh):
    cfg, params = setup
    token_class = vocab.model_token_classes(vocab.token_classes(spm_vocab), cfg.vocab_size)
    e = engine_lib.Engine(cfg, params, token_class, ["grammar", "assistant"], mesh,
                          max_batch=4, steps_per_call=4)
    e.start()
    yield e
    e.stop()


class Collected:
    def __init__(self):
        self.tokens, self.modes, self.final_state, self.error = [], [], None, None
        self.done = threading.Event()

    def callbacks(self):
        def on_tokens(tokens, token_modes, _):
            self.tokens += tokens
            self.modes += token_modes

        def on_done(state):
            self.final_state = state
            self.done.set()

        def on_error(e):
            self.error = e
            self.done.set()

        return dict(on_tokens=on_tokens, on_done=on_done, on_error=on_error)


def submit(engine, prompt, policy, **kw):
    out = Collected()
    engine.submit(engine_lib.Request(prompt_ids=prompt.ids, policy=policy, state=prompt.state,
                                     **{"max_new_tokens": 20, **kw}, **out.callbacks()))
    return out


def wait(results):
    for r in results:
        assert r.done.wait(WAIT_S)
        assert r.error is None, r.error
    return results


PROMPTS = ["", "Tell me a story.", "The weather, the sea and a boat", "Hi",
           "What is <ai> doing here?", "x" * 12, "Once upon a time", "Help me, it is due"]


def test_greedy_rows_equal_the_one_shot_sampler(engine, setup, spm_vocab, mesh):
    cfg, params = setup
    sampler = sampling.Sampler(cfg, params, spm_vocab, "grammar", mesh,
                               sampling.SamplingConfig(max_new_tokens=20, temperature=0))
    prompts = [sampling.make_prompt(t, spm_vocab, "grammar", mode=m)
               for t in PROMPTS for m in (None, "ai")]
    assert max(len(p.ids) for p in prompts) + 21 <= cfg.max_len
    compactions = engine.stats.compactions
    got = wait([submit(engine, p, "grammar", temperature=0.0) for p in prompts])
    expected = sampler.generate(prompts)
    for p, g, e in zip(prompts, got, expected):
        assert g.tokens == list(e.tokens), p.text
        assert g.modes == list(e.modes)
        assert g.final_state == e.final_state
    # 16 requests through 4 rows of 132 slots: the cache was compacted under them
    assert engine.stats.compactions > compactions


def test_a_seed_gives_the_same_draw_whatever_else_runs(engine, spm_vocab):
    prompt = sampling.make_prompt("Tell me a story.", spm_vocab, "grammar")
    kw = dict(temperature=1.0, top_p=1.0)
    first = wait([submit(engine, prompt, "grammar", seed=7, **kw)])[0]
    crowd = [submit(engine, prompt, "grammar", seed=s, **kw) for s in range(6)]
    again = submit(engine, prompt, "grammar", seed=7, **kw)
    wait(crowd + [again])
    assert again.tokens == first.tokens
    assert len({tuple(c.tokens) for c in crowd}) > 1


def test_every_row_keeps_its_own_policy(engine, spm_vocab):
    results = []
    for i in range(12):
        policy = ("grammar", "assistant")[i % 2]
        prompt = sampling.make_prompt("Say something.", spm_vocab, policy, mode="ai")
        results.append((policy, submit(engine, prompt, policy, temperature=2.0, top_p=1.0,
                                       seed=i, max_new_tokens=40)))
    wait([r for _, r in results])
    classes = vocab.token_classes(spm_vocab)
    for policy, r in results:
        tables = modes.get_policy(policy).compile()
        start = sampling.make_prompt("Say something.", spm_vocab, policy, mode="ai").state
        assert modes.first_violation(tables, classes[r.tokens].tolist(), start) is None
        assert "<invalid>" not in r.modes


def test_a_stop_token_ends_the_request(engine, spm_vocab):
    for text in PROMPTS:  # the first whose greedy continuation has 3 tokens to stop at
        prompt = sampling.make_prompt(text, spm_vocab, "grammar")
        free = wait([submit(engine, prompt, "grammar", temperature=0.0)])[0]
        if len(free.tokens) >= 3:
            break
    else:
        pytest.fail("no prompt's greedy continuation has 3 tokens")
    stopped = wait([submit(engine, prompt, "grammar", temperature=0.0,
                           stop_token=free.tokens[2])])[0]
    end = free.tokens.index(free.tokens[2]) + 1
    assert stopped.tokens == free.tokens[:end]


def test_a_cancelled_request_frees_its_row(engine, spm_vocab):
    prompt = sampling.make_prompt("Tell me a story.", spm_vocab, "grammar")
    out = Collected()
    calls = []

    def on_tokens(tokens, *_):
        calls.append(tokens)
        request.cancelled = True  # as the server does when the client goes away

    request = engine_lib.Request(prompt_ids=prompt.ids, policy="grammar", state=prompt.state,
                                 max_new_tokens=40, temperature=0.0, on_tokens=on_tokens,
                                 on_done=out.callbacks()["on_done"],
                                 on_error=out.callbacks()["on_error"])
    engine.submit(request)
    after = wait([submit(engine, prompt, "grammar", temperature=0.0)])[0]  # served after
    assert len(calls) == 1 and not out.done.is_set()  # no more tokens, no completion
    assert len(after.tokens) > 0
    assert engine.active == 0


def quote_prompt(spm_vocab, turn):
    """The user's `turn`, then the assistant's span with a quote opened (a prompt left
    inside a quote: its copy may start anywhere in the turn)."""
    opened = "<ai><quote>"
    text = sampling.make_prompt(turn, spm_vocab, "assistant", mode="ai").text[:-4] + opened
    return sampling.Prompt(text, tuple(spm_vocab.encode(text)),
                           tags.prefix_state(opened, "assistant"))


def test_rows_that_ask_for_faithful_quotes_copy_their_own_users_turn(engine, setup,
                                                                     spm_vocab, mesh):
    """Rows with and without the copy constraint side by side, each with its own turn:
    greedy rows draw what the one-shot sampler draws with `copy_quotes` (on) or without
    it (off); sampled rows quote only their own turn (`tags.is_copy`)."""
    cfg, params = setup
    turns = ["Sam kept the wallet", "Tell Ana it was mine", "Hi there", "Send it twice"]
    prompts = [quote_prompt(spm_vocab, t) for t in turns]
    for copy_quotes in (True, False):
        sampler = sampling.Sampler(cfg, params, spm_vocab, "assistant", mesh,
                                   sampling.SamplingConfig(max_new_tokens=16, temperature=0,
                                                           copy_quotes=copy_quotes))
        assert max(len(p.ids) for p in prompts) + 17 <= cfg.max_len
        got = wait([submit(engine, p, "assistant", temperature=0.0, copy_quotes=c,
                           max_new_tokens=16)
                    for p in prompts for c in (copy_quotes, not copy_quotes)])[::2]
        assert [g.tokens for g in got] == [list(e.tokens) for e in sampler.generate(prompts)]
    sampled = wait([submit(engine, p, "assistant", temperature=1.0, top_p=1.0, seed=s,
                           copy_quotes=True, max_new_tokens=16)
                    for s in range(3) for p in prompts])
    quotes = [q for p, r in zip(prompts * 3, sampled)
              for q in judging.quotes("<quote>" + sampling.decode_text(spm_vocab, r.tokens,
                                                               len(r.tokens)), p.text)]
    assert len(quotes) >= 12 and all(faithful for _, faithful in quotes), quotes
    assert sum(len(text.split()) for text, _ in quotes) >= 12  # words copied, not only redacted
