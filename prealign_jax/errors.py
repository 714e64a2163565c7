"""The base of every error caused by something the user controls.

Such errors carry a message that names the file, record, flag or gin binding at fault and
what to do; the CLI prints that one line (exit status 2) instead of a traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input or configuration, with an actionable message."""


class TrainError(UserError):
    """A training configuration or run that cannot go on (names the binding to change).
    Here, not in train.py: the loop's hooks raise it too."""
