"""Every path a URL: data dirs, workdirs and reports may be local paths or `gs://...`.

The library reads and writes such files through one layer, `tf.io.gfile` (`gfile()`): the
one seqio and tf.data use, which knows local paths, `gs://` and TF's in-memory `ram://`
(tests). Paths are joined with `os.path.join` (right for `scheme://` URLs too); the two
helpers here cover what `os` gets wrong for URLs.
"""

from __future__ import annotations

import os

from prealign_jax import tf_cpu


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
