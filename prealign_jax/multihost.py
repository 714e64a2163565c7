"""One training job as several processes (one per host of a TPU slice or GPU cluster):
joining the job, failing fast, and a start-up line.

Runtime. `train.distributed` holds the keyword arguments of `jax.distributed.initialize`
({} auto-detects Cloud TPU, SLURM, Open MPI, Kubernetes; else `coordinator_address`,
`num_processes`, `process_id`); `heartbeat_timeout_seconds` (default 100) bounds how long
a dead peer goes unnoticed. On CPU the collectives across processes need gloo
(JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo), which makes this path testable on one machine.

Failure. JAX's coordination service aborts every process once a peer has missed
heartbeats for the heartbeat timeout ("... detected fatal errors. This most likely
indicates that another task died"), and aborts a process that cannot reach the others
within `initialization_timeout`. A peer that fails with a *Python* error would instead
wait at JAX's shutdown barrier while the others block in a collective: a hang.
`fail_fast()` therefore ends a failed process at once (after printing its error), so its
silence stops the others within the heartbeat timeout.

Which data each process reads is `data/feed.py`'s concern.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import sys
import traceback
from typing import Any, Mapping

import jax

from prealign_jax import console
from prealign_jax.errors import UserError


class MultihostError(UserError):
    """A multi-process configuration that cannot work (names the binding to change)."""


def initialize(kwargs: Mapping[str, Any]) -> None:
    """`jax.distributed.initialize(**kwargs)` (`train.distributed`), saying first on stderr
    which job this process joins, so that a process aborted by JAX for a missing peer
    (DEADLINE_EXCEEDED at RegisterTask) shows what it was waiting for."""
    who = (f"process {kwargs['process_id']} of {kwargs.get('num_processes', '?')}"
           if "process_id" in kwargs else "a process (cluster auto-detected)")
    _stderr(f"{who} on {socket.gethostname()}: joining the job at "
            f"{kwargs.get('coordinator_address') or 'the detected coordinator'}; all must "
            f"join within {kwargs.get('initialization_timeout', 300)}s "
            "(train.distributed['initialization_timeout'])")
    try:
        jax.distributed.initialize(**kwargs)
    except (TypeError, ValueError) as e:  # a bad key, or no cluster found and none given
        raise MultihostError(
            f"train.distributed={dict(kwargs)}: {str(e).splitlines()[0]} Run under a "
            "scheduler JAX detects (Cloud TPU, SLURM, Open MPI, Kubernetes) or give "
            "coordinator_address, num_processes and process_id") from None


@contextlib.contextmanager
def fail_fast():
    """Run the body as this process's part of the job; if it fails in a multi-process
    job, print the error and exit at once (see the module docstring: the others then stop
    within the heartbeat timeout instead of hanging)."""
    try:
        yield
    except BaseException as e:
        if not jax.distributed.is_initialized() or (
                isinstance(e, SystemExit) and not e.code):
            raise
        if isinstance(e, UserError):
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message, code = f"prealign: error: {text}", 2
        else:
            message, code = traceback.format_exc().rstrip(), 1
        _stderr(f"a process on {socket.gethostname()} failed; ending it now so that the "
                f"others stop within the heartbeat timeout:\n{message}")
        sys.stdout.flush()
        console.restore_stderr()  # os._exit skips atexit: forward what is pending now
        os._exit(code)


def describe(mesh: jax.sharding.Mesh) -> str:
    """One start-up line that makes a missing host or device visible: processes, devices,
    platform, and each process's device count."""
    per_process = collections.Counter(d.process_index for d in mesh.devices.flat)
    counts = ", ".join(str(per_process[p]) for p in range(jax.process_count()))
    return (f"job: {jax.process_count()} process(es) | {jax.device_count()} "
            f"{jax.devices()[0].platform} devices | devices per process: {counts}")


def _stderr(line: str) -> None:
    print(f"prealign: {line}", file=sys.stderr, flush=True)
