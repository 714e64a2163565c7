"""The server process: a run's model in the engine, the app on uvicorn, a clean exit.

The socket is bound here (port 0 picks a free port; the "serving on" line names it), the
engine's programs are compiled before the line is printed, and uvicorn's SIGTERM/SIGINT
handling drains: no new connections, in-flight requests finish (up to `drain_timeout`
seconds), then the engine stops and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket

from prealign_jax import console, engine as engine_lib, vocab as vocab_lib
from prealign_jax.errors import UserError


class ServeError(UserError):
    """A server setting that cannot work (names the flag and what to do)."""


def read_api_key(path: str) -> str:
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ServeError(f"--api_key_file={path}: {e.strerror}; give a file holding the "
                         "key") from None
    if not key or len(key.split()) != 1:
        raise ServeError(f"--api_key_file={path}: must hold one key (no spaces)")
    return key


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"--host={host} --port={port}: cannot listen there "
                         f"({e.strerror}); choose another port or host") from None
    sock.listen(2048)
    return sock


def serve(run, *, host: str = "127.0.0.1", port: int = 8000, policy: str = "assistant",
          policies: list[str] | None = None, max_batch: int = 16, steps_per_call: int = 8,
          max_n: int = 8, api_key: str | None = None, allow_unmasked: bool = False,
          name: str | None = None, drain_timeout: float = 60.0,
          tagged_content: bool = False, copy_quotes: bool = False) -> None:
    """Serve `run` (an `inference.Run`) until SIGTERM/SIGINT."""
    import uvicorn

    from prealign_jax.serving import app as app_lib

    policies = list(dict.fromkeys([policy] + list(policies or [])))
    name = name or os.path.basename(os.path.normpath(run.workdir))
    engine_lib.check_max_batch(max_batch, run.mesh)
    sock = bind(host, port)  # before compiling: a taken port fails at once
    clock = console.Clock("serve")
    token_class = vocab_lib.model_token_classes(vocab_lib.token_classes(run.vocab),
                                                run.model_cfg.vocab_size)
    engine = engine_lib.Engine(run.model_cfg, run.params, token_class, policies, run.mesh,
                               max_batch=max_batch, steps_per_call=steps_per_call,
                               progress=clock.say)
    engine.start()
    app = app_lib.create_app(app_lib.Served(
        name=name, engine=engine, vocab=run.vocab, max_len=run.model_cfg.max_len,
        default_policy=policy, allow_unmasked=allow_unmasked, max_n=max_n,
        api_key=api_key, tagged_content=tagged_content, copy_quotes=copy_quotes))
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=drain_timeout)
    actual = sock.getsockname()[1]
    clock.say(f"serving {name} (step {run.step}) on http://{host}:{actual}/v1 | policies "
              f"{', '.join(policies)} (default {policy}) | {max_batch} rows | "
              f"mask {'switchable' if allow_unmasked else 'always on'}"
              f"{' | API key required' if api_key else ''}"
              f"{' | tagged content' if tagged_content else ''}"
              f"{' | quotes copy the user' if copy_quotes else ''}")
    # uvicorn drains on SIGTERM/SIGINT, restores the handlers it found, and raises the
    # signal again: with these no-op handlers found, the process goes on to stop the
    # engine and exits 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.stop()
        clock.say("stopped")
