"""A failure inside one request answers that request with a 500 and nothing else: the
server (in this process, on a real socket, called with the `openai` client) goes on
serving, and a failed decode step fails only the rows it held."""

import threading

import jax
import openai
import pytest
import uvicorn

from conftest import random_decoder

from prealign_jax import engine as engine_lib, partitioning, sampling
from prealign_jax import vocab
from prealign_jax.serving import app as app_lib, server as server_lib


@pytest.fixture(scope="module")
def served(spm_vocab):
    cfg, params = random_decoder(spm_vocab.vocab_size, max_len=64)
    token_class = vocab.model_token_classes(vocab.token_classes(spm_vocab), cfg.vocab_size)
    engine = engine_lib.Engine(cfg, params, token_class, ["assistant"],
                               partitioning.make_mesh(devices=jax.devices()[:1]),
                               max_batch=2, steps_per_call=2)
    engine.start()
    sock = server_lib.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app_lib.create_app(app_lib.Served(
        name="random", engine=engine, vocab=spm_vocab, max_len=cfg.max_len,
        default_policy="assistant")), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                           api_key="unused", max_retries=0, timeout=300)
    while not server.started:  # a deadlock guard is the test's timeout
        thread.join(0.05)
    yield engine, client
    server.should_exit = True
    thread.join()
    engine.stop()


def ask(client, text="Hello", **kw):
    return client.chat.completions.create(
        model="random", messages=[{"role": "user", "content": text}], max_tokens=8, **kw)


def test_an_exception_in_one_request_is_a_500_for_it_alone(served, monkeypatch):
    _, client = served
    make = sampling.chat_prompt

    def failing(messages, *args):
        if "BOOM" in messages[-1][1]:
            raise RuntimeError("a bug in the template")
        return make(messages, *args)

    monkeypatch.setattr(sampling, "chat_prompt", failing)
    with pytest.raises(openai.InternalServerError, match="a bug in the template"):
        ask(client, "BOOM")
    assert ask(client).choices[0].finish_reason in ("stop", "length")


def test_a_failed_decode_step_fails_its_rows_and_the_engine_goes_on(served, monkeypatch):
    engine, client = served
    step = engine._step_program
    failures = [RuntimeError("device lost its mind")]

    def flaky(*args):
        if failures:
            raise failures.pop()
        return step(*args)

    monkeypatch.setattr(engine, "_step_program", flaky)
    with pytest.raises(openai.InternalServerError, match="device lost its mind"):
        ask(client)
    answers = [ask(client, f"Hello {i}", seed=i) for i in range(3)]
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
