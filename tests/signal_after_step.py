"""`prealign ARGS` (a train command) sent SIGNAL (KILL or TERM) right after step STEP,
once the checkpoint directory CHECKPOINT is complete: test_train_resume's crash and
preemption, at a point the run waits at rather than a race against it.

    python tests/signal_after_step.py SIGNAL STEP CHECKPOINT ARGS...
"""

import functools
import os
import signal
import sys
import time

from prealign_jax import hooks, main, train


class SignalAfter(hooks.Hook):
    """After `step`'s other hooks: wait for `checkpoint` (orbax renames a save into place
    once it is complete), then send `signum` to this process (SIGKILL: no warning, no
    cleanup; SIGTERM: a preemption)."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def after_step(self, run):
        if run.step != self.step:
            return
        deadline = time.monotonic() + 300
        while not os.path.isdir(self.checkpoint):
            assert time.monotonic() < deadline, f"{self.checkpoint} was never completed"
            time.sleep(0.05)
        os.kill(os.getpid(), self.signum)


if __name__ == "__main__":
    name, step, checkpoint, *args = sys.argv[1:]
    hook = SignalAfter(signal.Signals[f"SIG{name}"], int(step), checkpoint)
    train.train = functools.partial(train.train, hooks=[hook])
    sys.exit(main.main(args))
