"""The training loop's hooks: everything after a step besides the step itself.

The loop runs a step, records it in the `Run`, then calls `after_step(hooks, run)`, which
asks every hook, in list order, first whether this step ends the run (`ends_run`:
preemption), then what it will do at it (`plan`: True if it will read device values), and
only then runs each hook's `after_step`, in list order. Order is semantics: the standard
list (`train._loop`) is NanGuard, Log, Eval, Checkpoint, Preemption, Profile, then the
caller's own hooks, so a diverged state is stopped before it is logged as fine or
checkpointed, and a preempted run is saved before it stops (`Preempted`).

Host sync happens only at steps some hook plans to read device values at (log, eval and
checkpoint steps): per-step metrics stay on device in `Run.pending` until then. Hooks take
plain arguments; the train-specific parts (folding metrics, evaluating) are passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from prealign_jax import checkpointing, console, fileio
from prealign_jax.errors import Preempted, TrainError


@dataclasses.dataclass
class Run:
    """What hooks see: one object for the run, updated after each step."""

    num_steps: int
    start_step: int  # the restored step (0: a fresh run)
    state: Any  # the train state after `step`
    step: int = 0
    last: bool = False  # this step ends the run: num_steps reached, or preemption
    sync: bool = False  # some hook reads device values at this step
    # Per-step metrics (step, dict) not yet folded into a log line: device arrays until a
    # step some hook reads them at, then host copies.
    pending: list = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)  # the last log line's metrics
    # Start of the tokens/s window; time spent not training (evaluation, blocking saves)
    # moves it forward by that time (`not_training`).
    window_start: float = dataclasses.field(default_factory=time.perf_counter)

    def record(self, step: int, state, metrics: dict) -> None:
        self.step, self.state = step, state
        self.last = step == self.num_steps
        self.pending.append((step, metrics))

    def restart_window(self) -> None:
        """Start a new tokens/s window now (after a log line, or after compilation)."""
        self.window_start = time.perf_counter()

    @contextlib.contextmanager
    def not_training(self):
        """A block that is not training (evaluation, the blocking part of a save): the steps
        dispatched so far finish first, and count as training; the block's own time is
        taken out of the window, whose steps all still count."""
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start


class Hook:
    """Does something after some steps. Every method is optional; `ends_run` and `plan`
    are asked of every hook once per step, before any hook's `after_step`."""

    def ends_run(self, run: Run) -> bool:
        """Whether the run stops after this step (it is then `run.last` for every hook)."""
        return False

    def plan(self, run: Run) -> bool:
        """Decide what to do at `run.step`; True if `after_step` will read device values."""
        return False

    def after_step(self, run: Run) -> None:
        pass

    def close(self) -> None:
        """At the end of the run, also when it failed."""


def after_step(hooks: Sequence[Hook], run: Run) -> bool:
    """Run the hooks for `run.step` (see the module docstring); True if the run stops."""
    # lists, not generators: every hook is asked (preemption polls are multi-host syncs)
    run.last = any([h.ends_run(run) for h in hooks]) or run.last
    run.sync = any([h.plan(run) for h in hooks])
    for h in hooks:
        h.after_step(run)
    return run.last


class NanGuard(Hook):
    """At steps where a hook reads device values, fetch the pending metrics first and stop
    the run at the first non-finite loss: before anything logs or checkpoints it."""

    def __init__(self, checkpoints: checkpointing.Checkpoints):
        self._checkpoints = checkpoints

    def after_step(self, run: Run) -> None:
        if not run.sync:
            return
        fetched = jax.device_get([m for _, m in run.pending])
        for (step, _), m in zip(run.pending, fetched):
            if not np.isfinite(m["loss_sum"]):
                raise TrainError(
                    f"step {step}: the loss is {m['loss_sum']}; stopped without saving it "
                    f"(last checkpoint: step {self._checkpoints.latest_step()}). Lower "
                    "OptimizerConfig.learning_rate or raise warmup_steps, or check the data")
        run.pending[:] = [(s, m) for (s, _), m in zip(run.pending, fetched)]


class Log(Hook):
    """Every `every` steps and at the run's last: fold the pending metrics (`summarize`),
    add tokens/s and MFU over the window, write them and a console line.

    The window excludes the first step (compilation), evaluation and blocking saves."""

    def __init__(self, writer, every: int, summarize: Callable[[list[dict]], dict], *,
                 tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self._writer, self._every, self._summarize = writer, every, summarize
        self._tokens_per_step = tokens_per_step
        self._flops_per_token, self._peak = flops_per_token, peak_flops
        self._window_steps, self._due = 0, False

    def plan(self, run: Run) -> bool:
        self._due = run.step % self._every == 0 or run.last
        return self._due

    def after_step(self, run: Run) -> None:
        self._window_steps += 1
        if run.step == run.start_step + 1:  # compiled this step: start the window after it
            jax.block_until_ready(run.pending[-1][1])
            run.restart_window()
            self._window_steps = 0
        if not self._due:
            return
        s = self._summarize(jax.device_get([m for _, m in run.pending]))
        elapsed = time.perf_counter() - run.window_start
        if self._window_steps and elapsed > 0:
            s["tokens/s"] = self._window_steps * self._tokens_per_step / elapsed
            s["mfu"] = s["tokens/s"] * self._flops_per_token / self._peak
        self._writer.write_scalars(run.step, s)
        self._writer.flush()
        parts = [f"step {run.step}/{run.num_steps}", f"loss {s['loss']:.4f}"]
        parts += [f"{k} {s[k]:,.0f}" if k == "tokens/s" else f"{k} {s[k]:.1%}" if k == "mfu"
                  else f"{k} {s[k]:.3g}"
                  for k in ("tokens/s", "mfu", "learning_rate", "grad_norm") if k in s]
        console.say(" | ".join(parts + _group_losses(s)))
        run.summary, run.pending[:] = s, []
        run.restart_window()
        self._window_steps = 0


class Eval(Hook):
    """Every `every` steps and at num_steps: `evaluate(state)` -> scalars, written with an
    `eval/` prefix, and a console line."""

    def __init__(self, writer, every: int, evaluate: Callable[[Any], dict[str, float]]):
        self._writer, self._every, self._evaluate = writer, every, evaluate
        self._due = False

    def plan(self, run: Run) -> bool:
        self._due = run.step % self._every == 0 or run.step == run.num_steps
        return self._due

    def after_step(self, run: Run) -> None:
        if not self._due:
            return
        with run.not_training():
            s = self._evaluate(run.state)
            self._writer.write_scalars(run.step, {f"eval/{k}": v for k, v in s.items()})
            self._writer.flush()
        console.say(" | ".join([f"eval step {run.step}", f"loss {s['loss']:.4f}"]
                               + _group_losses(s)))


def _group_losses(s: dict[str, float]) -> list[str]:
    return [f"{k[len('loss/'):]} {v:.3f}" for k, v in s.items() if k.startswith("loss/")]


class Checkpoint(Hook):
    """Save the state and data position at `checkpoints`' interval (async) and at the run's
    last step (forced: end of run or preemption)."""

    def __init__(self, checkpoints: checkpointing.Checkpoints, iterator):
        self._checkpoints, self._iterator = checkpoints, iterator
        self._due = False

    def plan(self, run: Run) -> bool:
        self._due = run.last or self._checkpoints.should_save(run.step)
        return self._due

    def after_step(self, run: Run) -> None:
        if self._due:
            with run.not_training():
                self._checkpoints.save(run.step, run.state, self._iterator, force=run.last)


class Preemption(Hook):
    """End the run at the preemption step (SIGTERM, or the step all processes agree on);
    the Checkpoint hook saves it as the last step. `preempted` tells the loop to raise
    `Preempted` once the save is complete."""

    def __init__(self, checkpoints: checkpointing.Checkpoints):
        self._checkpoints = checkpoints
        self.preempted = False

    def ends_run(self, run: Run) -> bool:
        self.preempted = self._checkpoints.reached_preemption(run.step)
        return self.preempted

    def error(self, step: int) -> Preempted:
        return Preempted(f"preempted: saved step {step} to {self._checkpoints.directory}; "
                         "rerun the same command to resume")


class Profile(Hook):
    """A `jax.profiler` trace of the steps after `start` up to `stop` (process 0), in
    `<logdir>/plugins/profile/<time>/`: an .xplane.pb for TensorBoard's profile plugin
    (XProf) and a perfetto_trace.json.gz for ui.perfetto.dev. The state is waited for at
    both ends, so the trace holds exactly those steps."""

    def __init__(self, logdir: str, steps: tuple[int, int]):
        pair = isinstance(steps, (tuple, list)) and len(steps) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in steps)
        if not pair or not 1 <= steps[0] < steps[1]:
            raise TrainError(f"train.profile_steps={steps!r} must be (start, stop) "
                             "integers with 1 <= start < stop: the steps after start up to "
                             "stop")
        self._logdir, (self._start, self._stop) = logdir, steps
        self._tracing = False

    def after_step(self, run: Run) -> None:
        if jax.process_index() != 0:
            return
        if run.step == self._start and not run.last:
            jax.block_until_ready(run.state)
            fileio.gfile().makedirs(self._logdir)
            jax.profiler.start_trace(self._logdir, create_perfetto_trace=True)
            self._tracing = True
        elif run.step == self._stop and self._tracing:
            jax.block_until_ready(run.state)
            self.close()

    def close(self) -> None:
        if self._tracing:
            self._tracing = False
            jax.profiler.stop_trace()
