"""Import TensorFlow for data pipelines only: keep it off every accelerator.

seqio pulls in TensorFlow; left alone, TF grabs GPU memory (and can claim TPU devices) that
JAX needs. Every module that imports tensorflow or seqio goes through `import_tf()` first.
"""

import os


def import_tf():
    """TensorFlow with GPUs and TPUs hidden from it (idempotent); returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            pass  # already initialised with none visible, or the kind does not exist
    return tf
