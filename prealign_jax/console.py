"""The console: the one path every command's progress lines take.

Lines go through the `prealign` logger to stdout, plain (no level or logger prefix: they
are what a user reads), from process 0 only in a multi-process job. `configure` sets the
level from the CLI's `--verbosity` (0 warnings only, 1 progress, 2 debug); library code only
calls `say` / `Clock.say` / `LOG.warning`; used from a notebook, the first line configures
verbosity 1.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import time

LOG = logging.getLogger("prealign")
VERBOSITY_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
# Python loggers of libraries that log routine start-up lines at INFO/WARNING.
NOISY_LOGGERS = ("absl", "tensorflow", "jax._src.xla_bridge", "orbax", "h5py")
_quiet_native = True  # silence native libraries' start-up lines (verbosity < 2)
# Routine lines native code (TensorFlow, absl, XLA, SentencePiece, gloo) writes straight to
# file descriptor 2 while a command runs; `filter_native_stderr` drops them.
NATIVE_NOISE = re.compile(
    r"^(?:[IWE]\d{4} [\d:. ]+\d+ (?:"
    r"port\.cc:\d+\] oneDNN custom operations"
    r"|util\.cc:\d+\] oneDNN supports"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|cache_dataset_ops\.cc:\d+\] The calling iterator did not fully read)"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty"
    r"|\[Gloo\] Rank \d+ is connected"
    # apache-beam's import-time note on an optional extra (apache-beam[gcp]) we do not use
    r"|WARNING:root:apitools not found, and bigquery client libraries are not available)")


def configure(verbosity: int = 1) -> None:
    """Send `prealign` lines to stdout at the level of `verbosity` (idempotent)."""
    LOG.setLevel(VERBOSITY_LEVELS[max(0, min(verbosity, 2))])
    LOG.propagate = False
    if not any(isinstance(h, _Stdout) for h in LOG.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)


class _Stdout(logging.StreamHandler):
    """A handler on whatever `sys.stdout` is at each line (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def quiet_libraries(verbosity: int = 1) -> None:
    """Below verbosity 2, the libraries' noise is off: TensorFlow's and CUDA's native
    start-up lines (`port.cc`, `cudart_stub`, `cuInit`: `native_stderr_quieted`), their
    routine runtime lines (`filter_native_stderr`, which the CLI installs), absl's and
    TensorFlow's Python warnings; at 2 everything is shown."""
    global _quiet_native
    _quiet_native = verbosity < 2
    level = logging.WARNING if verbosity >= 2 else logging.ERROR
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbosity >= 2:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


def filter_native_stderr() -> None:
    """For the rest of the process, lines written to file descriptor 2 pass through a
    thread that drops `NATIVE_NOISE` (TensorFlow's runtime lines, SentencePiece's model
    loads, ...) and forwards everything else — errors, tracebacks, progress bars — to the
    real stderr. The CLI installs it below verbosity 2; `restore_stderr` (at exit, or
    before `os._exit`) forwards what is pending and puts fd 2 back."""
    global _filter
    if _filter is not None:
        return
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward():
        pending = b""
        while chunk := os.read(read, 65536):
            pending += chunk
            *lines, pending = re.split(rb"(?<=[\r\n])", pending)
            for line in lines:
                if not NATIVE_NOISE.match(line.decode("utf-8", "replace")):
                    os.write(real, line)
        if pending:
            os.write(real, pending)
        os.close(read)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    _filter = (real, thread)
    atexit.register(restore_stderr)


_filter = None  # (the real stderr's fd, the forwarding thread) while filtering


def restore_stderr() -> None:
    """Stop filtering: fd 2 is the real stderr again, and what was written before is out."""
    global _filter
    if _filter is None:
        return
    real, thread = _filter
    _filter = None
    sys.stderr.flush()
    os.dup2(real, 2)  # the pipe's last writer is gone: the thread reads to its end
    thread.join(timeout=5)
    os.close(real)


@contextlib.contextmanager
def native_stderr_quieted():
    """Native libraries print start-up lines straight to file descriptor 2, before (and
    regardless of) TF_CPP_MIN_LOG_LEVEL or Python's logging; while they are imported fd 2
    points at /dev/null (unless `quiet_libraries(2)`). Python errors still surface: they are
    raised after fd 2 is restored."""
    if not _quiet_native:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _process_zero() -> bool:
    if "jax" not in sys.modules:  # data preparation never starts JAX
        return True
    import jax

    return jax.process_index() == 0


def say(line: str, level: int = logging.INFO) -> None:
    """A progress line (process 0 only)."""
    if not LOG.handlers:
        configure()
    if _process_zero():
        LOG.log(level, line)
        for handler in LOG.handlers:
            handler.flush()


class Clock:
    """Progress lines prefixed with the time since the clock started, e.g.
    `[eval   12.3s] held-out: ...` or `[experiment   1.2 min] prepare ...`."""

    def __init__(self, name: str, minutes: bool = False):
        self.name, self.minutes, self.start = name, minutes, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, line: str) -> None:
        t = self.elapsed()
        stamp = f"{t / 60:5.1f} min" if self.minutes else f"{t:6.1f}s"
        say(f"[{self.name} {stamp}] {line}")
