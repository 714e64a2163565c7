"""`prealign ARGS` (a train command) killed by SIGKILL right after step STEP, once the
checkpoint directory CHECKPOINT is complete: test_train_resume's crash, at a point the run
waits at rather than a race against it.

    python tests/crash_after_step.py STEP CHECKPOINT ARGS...
"""

import functools
import os
import signal
import sys
import time

from prealign_jax import hooks, main, train


class CrashAfter(hooks.Hook):
    """After `step`'s other hooks: wait for `checkpoint` (orbax renames a save into place
    once it is complete), then SIGKILL this process: no warning, no cleanup."""

    def __init__(self, step: int, checkpoint: str):
        self.step, self.checkpoint = step, checkpoint

    def after_step(self, run):
        if run.step != self.step:
            return
        deadline = time.monotonic() + 300
        while not os.path.isdir(self.checkpoint):
            assert time.monotonic() < deadline, f"{self.checkpoint} was never completed"
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    step, checkpoint, *args = sys.argv[1:]
    train.train = functools.partial(train.train, hooks=[CrashAfter(int(step), checkpoint)])
    sys.exit(main.main(args))
