"""`prealign serve` as a user meets it: a real server process on 127.0.0.1, called with the
official `openai` client (and plain HTTP for what that client cannot send): chat,
completions, streaming, the injection fuzz, 32 concurrent clients under the policy, every
bad input, the API key, /metrics, and SIGTERM draining the requests in flight."""

import concurrent.futures
import http.client
import json
import random
import signal
import socket
import threading

import openai
import pytest

from cli_helpers import KEY, WAIT_S, Server, train_tiny_run

from prealign_jax import modes, tags, vocab

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_tiny_run(workdir, max_len=128)
    return workdir


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    s = Server(run_dir, "--policies", "grammar", f"--api_key_file={key_file}",
               "--max_batch=8", "--model_name=tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def spm(run_dir):
    return vocab.load_dir(str(run_dir / "data"))


def prealign(choice) -> dict:
    return choice.model_extra["prealign"]


def assert_within_policy(ext, opened="<ai>"):
    assert "<invalid>" not in ext["modes"] and ext["final_state"] != "<invalid>"
    tags.prefix_state(opened + ext["tagged_text"], ext["policy"])  # raises if broken


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert json.loads(server.get("/health"))["status"] == "ok"


def test_chat_completion(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be kind."},
                                {"role": "user", "content": "Tell me about your day."}],
        max_tokens=24, seed=3, extra_body={"return_tagged": True})
    choice = r.choices[0]
    ext = prealign(choice)
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert len(ext["modes"]) == len(ext["token_ids"]) == r.usage.completion_tokens <= 24
    assert set(ext["modes"]) <= {"ai", "quote"}  # the assistant's turn, ended by </ai>
    assert ext["policy"] == "assistant" and ext["mask"] is True
    assert ext["prompt"] == "Be kind.\n<human>Tell me about your day.</human>\n<ai>"
    assert_within_policy(ext)


def test_completion_with_choices_and_a_policy(server):
    r = server.client().completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, n=3, seed=1,
        extra_body={"policy": "grammar", "return_tagged": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(prealign(c)["token_ids"]) for c in r.choices)
    for c in r.choices:
        assert prealign(c)["policy"] == "grammar"
        assert_within_policy(prealign(c), opened="")


def test_streaming_gives_the_same_text(server):
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=30,
              temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.message.content
    assert chunks[-1].usage.completion_tokens == len(prealign(whole)["token_ids"])
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].finish_reason == whole.finish_reason

    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stream=True))
    full = client.completions.create(model="tiny", prompt="Once upon a time",
                                     max_tokens=20, temperature=0).choices[0].text
    assert text == full
    stop = full[3:6]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


def test_a_request_can_ask_for_faithful_quotes(server):
    """`copy_quotes` (extra_body) switches the copy constraint per request; unset, the
    operator's `--copy_quotes` (off here). The tiny model never opens a quote, so what
    the constraint draws is tests/test_engine.py's; here, the switch and the policy."""
    client = server.client()
    for extra, expected in (({"copy_quotes": True}, True), ({}, False),
                            ({"copy_quotes": False}, False)):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell Sam it is mine."}],
            max_tokens=16, n=2, seed=5, extra_body={"return_tagged": True, **extra})
        for c in r.choices:
            assert prealign(c)["copy_quotes"] is expected
            assert_within_policy(prealign(c))
    with pytest.raises(openai.BadRequestError, match="copy_quotes"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                "content": "Hi"}],
                                       extra_body={"copy_quotes": "yes"})


def test_no_message_text_becomes_a_tag(server, spm):
    """The injection fuzz: tags, near-tags and escapes in every role's text; the prompt
    the model gets holds exactly the template's tag ids."""
    rng = random.Random(0)
    pieces = list(modes.TAGS) + ["<", ">", "/", "ai", "human", "\u2060", "<\u2060ai>", "&lt;",
                                 "quote", "redacted/", "\n", " ", "text"]
    tag_ids = set(vocab.tag_ids(spm).values())
    client = server.client()
    served = 0
    for i in range(40):
        roles = ["user"] + rng.choices(["user", "assistant"], k=rng.randrange(2))
        messages = [{"role": role, "content": "".join(rng.choices(pieces, k=4))}
                    for role in roles]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "".join(rng.choices(pieces, k=3))})
        try:
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                               extra_body={"return_tagged": True})
        except openai.BadRequestError as e:  # escaped tag-like text is long in tokens
            assert e.code == "context_length_exceeded"
            continue
        served += 1
        ext = prealign(r.choices[0])
        template_tags = 2 * len(roles) + 1  # each turn's pair, the opener
        assert sum(t in tag_ids for t in ext["prompt_token_ids"]) == template_tags, messages
        for m in messages:
            assert tags.escape(m["content"]) in ext["prompt"]
    assert served >= 30


def test_32_concurrent_clients_keep_the_policy(server):
    client = server.client()

    def one(i):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Request {i}: help me."}],
            max_tokens=40, temperature=1.5, top_p=1.0, seed=i,
            extra_body={"return_tagged": True})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    assert len(responses) == 32
    for r in responses:
        assert_within_policy(prealign(r.choices[0]))


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


BAD = [
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", chat_body(colour="blue"), 400, "colour"),
    ("/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature"),
    ("/v1/chat/completions", chat_body(max_tokens=True), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(temperature=-0.5), 400, "temperature"),
    ("/v1/chat/completions", chat_body(n=100), 400, "n"),
    ("/v1/chat/completions", chat_body(max_tokens=500), 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": [
        {"role": "user", "content": "word " * 300}]}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [
        {"role": "robot", "content": "Hi"}]}).encode(), 400, "messages.0.role"),
    ("/v1/chat/completions", chat_body(policy="anything_goes"), 400, "policy"),
    ("/v1/chat/completions", chat_body(mask=False), 403, "mask"),
    ("/v1/chat/completions", chat_body(model="gpt-4"), 404, "model"),
    ("/v1/completions", json.dumps({"prompt": "x", "mode": "human"}).encode(), 400, None),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, None),
    ("/v1/completions", json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413, None),
]


def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server):
    for path, body, status, param in BAD:
        got, error = server.post(path, body)
        assert got == status, (body[:80], error)
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["message"] and "\n" not in error["error"]["message"]
        if param:
            assert error["error"]["param"] == param, error
    for key in (None, "sk-wrong"):
        got, error = server.post("/v1/chat/completions", chat_body(), key=key)
        assert got == 401 and error["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model="tiny", prompt="x", max_tokens=10_000)
    got, _ = server.post("/v1/chat/completions", chat_body(max_tokens=2))
    assert got == 200


def test_metrics(server):
    server.client().completions.create(model="tiny", prompt="Hi", max_tokens=4)
    text = server.get("/metrics")
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['prealign_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert values['prealign_requests_total{path="/v1/chat/completions",status="400"}'] >= 1
    assert values["prealign_completion_tokens_total"] >= 4
    assert values["prealign_decode_row_steps_total"] >= values["prealign_decode_steps_total"] > 0
    assert values["prealign_batch_rows"] == 8
    assert values['prealign_request_latency_seconds_count{path="/v1/completions"}'] >= 1


def metric(server, name) -> float:
    return next(float(line.split()[-1]) for line in server.get("/metrics").splitlines()
                if line.startswith(name + " "))


def test_a_client_that_goes_away_frees_its_row_and_sigterm_drains(run_dir):
    s = Server(run_dir, "--steps_per_call=1", "--allow_unmasked", "--max_batch=4")
    client = s.client(key="unused")

    # A greedy stream of 120 tokens (this model does not end it sooner) whose client
    # leaves after the first chunk stops drawing: one step per call, so the 120 tokens take
    # 120 calls and the disconnect is seen within a few. Then 30 more tokens.
    body = {"prompt": "Story:", "temperature": 0, "policy": "assistant", "mask": False}
    before = metric(s, "prealign_completion_tokens_total")
    connection = http.client.HTTPConnection(s.base.removeprefix("http://"))
    connection.request("POST", "/v1/completions", json.dumps(
        {**body, "max_tokens": 120, "stream": True}), {"Content-Type": "application/json"})
    assert connection.getresponse().read1(64).startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    after = client.completions.create(model=None, prompt=body.pop("prompt"), max_tokens=30,
                                      extra_body=body)
    assert after.usage.completion_tokens == 30
    assert metric(s, "prealign_batch_rows_active") == 0
    assert metric(s, "prealign_completion_tokens_total") - before < 120 + 30

    started = threading.Barrier(5)

    def stream(i):
        chunks = client.completions.create(
            model=None, prompt=f"Story {i}:", max_tokens=100, stream=True, seed=i,
            extra_body={"mask": False, "policy": "assistant"})
        got = []
        for n, chunk in enumerate(chunks):
            if n == 0:
                started.wait(WAIT_S)
            got.append(chunk.choices[0])
        return got

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        started.wait(WAIT_S)  # every stream is under way
        s.proc.send_signal(signal.SIGTERM)
        results = [f.result(WAIT_S) for f in futures]
    assert s.proc.wait(WAIT_S) == 0
    for got in results:
        assert got[-1].finish_reason in ("stop", "length")
        assert prealign(got[-1])["mask"] is False
    assert "stopped" in "".join(s.lines)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


@pytest.mark.parametrize("flags, needle", [
    (["--policy=nope"], "unknown policy 'nope'"),
    (["--policies", "grammar", "nope"], "unknown policy 'nope'"),
    (["--api_key_file=/no/such/key"], "--api_key_file=/no/such/key: No such file"),
    (["--max_batch=0"], "--max_batch=0: must be >= 1"),
    (["--max_batch=3"], "--max_batch=3: must be a positive multiple of the mesh's 8"),
    (["--port=99999"], "--port=99999: must be in [0, 65535]"),
    (["--drain_timeout=nan"], "--drain_timeout=nan: must be a finite number"),
    (["--drain_timeout=-5"], "--drain_timeout=-5.0: must be a finite number"),
    (["--model_name= "], "--model_name: must not be empty"),
    ([], "cannot listen there"),
])
def test_bad_serve_flags_are_one_line_errors(run_dir, capsys, flags, needle):
    from prealign_jax import main

    with socket.socket() as taken:  # a port in use, for the case without other mistakes
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main.main(["serve", f"--workdir={run_dir}", f"--port={port}", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
