"""The teacher: any OpenAI-compatible endpoint, called concurrently and politely.

vLLM's server at scale, `prealign serve --tagged_content` here. Transport only — what to ask
is `teacher_tasks`, what to keep is `vetting`. The official `openai` client sends the
requests with its own retries off, so that every retry is counted by cause (429, 5xx,
timeout, connection) and honours the server's Retry-After: exponential backoff with jitter,
a client-side rate limit (requests started per second, per worker process), a timeout per
request, and at most `concurrency` requests in flight. A request that still fails after
`max_retries` is `TeacherUnavailable`: its brief is retried by the next run, never dropped.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import random
import time

from prealign_jax import fileio
from prealign_jax.errors import UserError

APIS = ("chat", "completions")


class TeacherError(UserError):
    """A teacher the run cannot use at all (unreachable, refused key, unknown model)."""


class TeacherUnavailable(Exception):
    """A request that failed `max_retries` times for transient causes."""


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher is and how hard to push it (plain and picklable: it travels to
    the Beam workers)."""
    url: str  # the API base, e.g. http://host:8000/v1
    model: str | None = None  # None: the endpoint's only model
    api: str = "chat"  # chat: an instruction-tuned teacher; completions: a base model
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str | None = None  # read instead of the env var (a path or URL)
    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    concurrency: int = 16  # requests in flight per worker process
    requests_per_s: float = 0.0  # per worker process; 0: no limit
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0  # first backoff; doubles per retry, with jitter
    max_backoff_s: float = 60.0
    flags: str = "teacher"  # the CLI's flag prefix errors name: --teacher_url, --judge_url

    def check(self) -> None:
        """One-line errors for values no run could use."""
        if self.api not in APIS:
            raise TeacherError(f"--{self.flags}_api={self.api}: use one of {', '.join(APIS)}")
        if not self.url.startswith(("http://", "https://")):
            raise TeacherError(f"--{self.flags}_url={self.url}: give the API base of an "
                               "OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
        for name in ("max_tokens", "concurrency", "timeout_s"):
            if not getattr(self, name) > 0:
                raise TeacherError(f"teacher {name}={getattr(self, name)}: must be > 0")
        for name in ("requests_per_s", "max_retries", "backoff_s", "temperature"):
            if getattr(self, name) < 0:
                raise TeacherError(f"teacher {name}={getattr(self, name)}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise TeacherError(f"teacher top_p={self.top_p}: must be in (0, 1]")
        for name in ("temperature", "timeout_s", "requests_per_s", "backoff_s",
                     "max_backoff_s"):
            if not math.isfinite(getattr(self, name)):
                raise TeacherError(f"teacher {name}={getattr(self, name)}: must be finite")

    def api_key(self) -> str:
        if self.api_key_file:
            if not fileio.gfile().exists(self.api_key_file):
                raise TeacherError(f"--{self.flags}_api_key_file={self.api_key_file}: no such "
                                   "file")
            with fileio.gfile().GFile(self.api_key_file) as f:
                return f.read().strip()
        # a server without keys (vLLM's default) takes any
        return os.environ.get(self.api_key_env) or "EMPTY"


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def resolve_model(config: TeacherConfig) -> str:
    """The model to ask: `config.model` checked against the endpoint's list, or its only
    model. Called once by the driver, so a wrong URL, key or name is one line before any
    work starts."""
    import openai

    client = openai.OpenAI(base_url=config.url, api_key=config.api_key(), max_retries=2,
                           timeout=min(config.timeout_s, 30.0))
    try:
        served = [m.id for m in client.models.list().data]
    except openai.AuthenticationError:
        raise TeacherError(f"teacher {config.url}: the API key was refused; set "
                           f"${config.api_key_env} or --{config.flags}_api_key_file") from None
    except openai.APIConnectionError as e:
        raise TeacherError(f"teacher {config.url}: cannot connect ({e.__cause__ or e}); "
                           f"start the server or fix --{config.flags}_url") from None
    except openai.APIStatusError as e:
        raise TeacherError(f"teacher {config.url}: GET /models answered {e.status_code}; "
                           "is it an OpenAI-compatible API base (ending in /v1)?") from None
    finally:
        client.close()
    if config.model is None:
        if len(served) != 1:
            raise TeacherError(f"teacher {config.url} serves {len(served)} models "
                               f"({', '.join(served)}); choose one with --{config.flags}_model")
        return served[0]
    if config.model not in served:
        raise TeacherError(f"--{config.flags}_model={config.model}: {config.url} serves "
                           f"{', '.join(served) or 'no model'}")
    return config.model


class _RateLimit:
    """Request starts spaced at least 1/rate apart (in one event loop)."""

    def __init__(self, per_s: float):
        self.interval, self.next = (1.0 / per_s if per_s > 0 else 0.0), 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            delay, self.next = self.next - now, max(self.next, now) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


class Teacher:
    """Asks the teacher inside one event loop; `stats` counts requests, retries by cause
    and tokens."""

    def __init__(self, config: TeacherConfig, model: str):
        import openai

        self.config, self.model = config, model
        self.client = openai.AsyncOpenAI(base_url=config.url, api_key=config.api_key(),
                                         max_retries=0, timeout=config.timeout_s)
        self.slots = asyncio.Semaphore(config.concurrency)
        self.rate = _RateLimit(config.requests_per_s)
        self.stats: collections.Counter = collections.Counter()

    async def close(self) -> None:
        await self.client.close()

    async def ask(self, prompt: str | list[dict], seed: int) -> Reply:
        """One completion of `prompt` (chat messages, or text for the completions API)."""
        import openai

        for attempt in range(self.config.max_retries + 1):
            async with self.slots:
                await self.rate.wait()
                self.stats["requests"] += 1
                try:
                    reply = await self._send(prompt, seed)
                except openai.APIStatusError as e:
                    cause = _transient_status(e.status_code)
                    if cause is None:
                        raise
                    wait = _retry_after(e)
                except openai.APITimeoutError:
                    cause, wait = "timeout", None
                except openai.APIConnectionError:
                    cause, wait = "connection", None
                else:
                    self.stats["prompt_tokens"] += reply.prompt_tokens
                    self.stats["completion_tokens"] += reply.completion_tokens
                    return reply
            if attempt == self.config.max_retries:
                self.stats[f"failed.{cause}"] += 1
                raise TeacherUnavailable(f"{cause} after {attempt + 1} attempts")
            self.stats[f"retries.{cause}"] += 1
            backoff = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
            await asyncio.sleep(wait if wait is not None
                                else backoff * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    async def _send(self, prompt, seed: int) -> Reply:
        c = self.config
        common = dict(model=self.model, max_tokens=c.max_tokens, temperature=c.temperature,
                      top_p=c.top_p, seed=seed)
        if c.api == "chat":
            r = await self.client.chat.completions.create(messages=prompt, **common)
            choice, text = r.choices[0], r.choices[0].message.content or ""
        else:
            r = await self.client.completions.create(prompt=prompt, **common)
            choice, text = r.choices[0], r.choices[0].text
        usage = r.usage
        return Reply(text, choice.finish_reason, usage.prompt_tokens if usage else 0,
                     usage.completion_tokens if usage else 0)


def _transient_status(status: int) -> str | None:
    """The retry cause of an HTTP status, or None if retrying cannot help."""
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    if status in (408, 409):
        return str(status)
    return None


def _retry_after(error) -> float | None:
    try:
        return min(float(error.response.headers.get("retry-after")), 300.0)
    except (TypeError, ValueError, AttributeError):
        return None
