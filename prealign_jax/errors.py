"""The base of every error caused by something the user controls.

Such errors carry a message that names the file, record, flag or gin binding at fault and
what to do; the CLI prints that one line (exit status 2) instead of a traceback. Also
`Preempted`, which is no mistake but ends a command the same way.
"""


class UserError(ValueError):
    """A mistake in the user's input or configuration, with an actionable message."""


class TrainError(UserError):
    """A training configuration or run that cannot go on (names the binding to change).
    Here, not in train.py: the loop's hooks raise it too."""


class Preempted(Exception):
    """The run stopped before its last step because it was preempted, its state saved.
    Raised by `train.train` once everything is closed, so that a caller going on to use
    the run (an evaluation, the next stage of an experiment) stops instead of taking a
    partial run for a finished one. Not a user error: the CLI exits with 143 (128 +
    SIGTERM) so that a scheduler's retry resumes it."""
