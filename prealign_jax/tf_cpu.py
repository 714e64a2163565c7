"""Import TensorFlow for data pipelines only: keep it off every accelerator.

seqio pulls in TensorFlow; left alone, TF grabs GPU memory (and can claim TPU devices) that
JAX needs. Every module that imports tensorflow or seqio goes through `import_tf()` first.
"""

import os


def import_tf():
    """TensorFlow with GPUs and TPUs hidden from it (idempotent), imported without its
    start-up noise (`console.native_stderr_quieted`); returns the module."""
    from prealign_jax import console

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with console.native_stderr_quieted():  # the device probe (cuInit) prints too
        import tensorflow as tf

        for kind in ("GPU", "TPU"):
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError):
                pass  # already initialised with none visible, or the kind does not exist
    return tf
