"""Every path a URL: data dirs, workdirs and reports may be local paths or `gs://...`.

The library reads and writes such files through one layer, `tf.io.gfile` (`gfile()`): the
one seqio and tf.data use, which knows local paths, `gs://` and TF's in-memory `ram://`
(tests). Paths are joined with `os.path.join` (right for `scheme://` URLs too); the two
helpers here cover what `os` gets wrong for URLs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from prealign_jax import tf_cpu
from prealign_jax.errors import UserError


def gfile():
    """`tf.io.gfile`, TensorFlow imported off the accelerators (`tf_cpu`) on first use."""
    return tf_cpu.import_tf().io.gfile


def absolute(path: str) -> str:
    """A local path made absolute; a URL (`scheme://...`) as it is (`os.path.abspath`
    would turn `gs://b/d` into `<cwd>/gs:/b/d`)."""
    return path if "://" in path else os.path.abspath(path)


def atomic_write(path: str, data: str | bytes) -> None:
    """Write `data` to a temporary name, then rename it to `path`: readers never see a
    half-written file (on GCS the rename is a copy, but each object appears whole)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with gfile().GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    gfile().rename(tmp, path, overwrite=True)


@contextlib.contextmanager
def exclusive(directory: str, what: str):
    """Hold `<directory>/.lock` while the block runs, or raise `Busy` at once if another
    process holds it: two jobs writing one run (checkpoints, metrics.jsonl) interleave
    their records and race their saves. An flock, released when the holder exits, even
    killed. Local directories only; a URL's (`gs://...`) is not locked (an object store
    has no lock: one job per workdir is the caller's to keep)."""
    if "://" in directory:
        yield
        return
    path = os.path.join(directory, ".lock")
    if os.path.isdir(path):
        raise Busy(f"{path} is a directory, not a lock file: remove it")
    with open(path, "a+", errors="replace") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise Busy(f"{directory} is in use by another process ({holder}, lock {path}): "
                       "wait for it to finish or stop it, or use another directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{what}, pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Busy(UserError):
    """`exclusive`: the directory is held by another process."""
