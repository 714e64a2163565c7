"""Test setup: CPU only, 8 fake devices, one compilation cache — set before anything
imports jax.

The tests compile the same tiny programs many times over (every train() and evaluate()
call, every CLI subprocess: the experiment's arms, the multi-host peers, the servers), so
a test run keeps XLA's persistent cache in one directory, made by the first pytest process
and inherited through the environment by the rest (pytest-xdist's workers, the
subprocesses the tests start). A size limit makes JAX lock the directory for every read
and write (with `filelock`), so processes sharing it (workers, multi-host peers) never read
an entry another one is still writing. Compiling is deterministic: a hit runs the very
executable a miss would build."""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="prealign-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


import random  # noqa: E402

import pytest  # noqa: E402

WORDS = ("the a cat dog kept change said nothing assistant help you find address home please "
         "neighbour wallet lied share quietly refused offered money friend Sam Ana").split()


def sample_documents(n, seed=0):
    """Small well-formed tagged documents (every tag appears) for vocabulary tests."""
    from prealign_jax import tags

    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."

    docs = []
    for _ in range(n):
        spans = [tags.Span("human", (sentence(),)),
                 tags.Span("ai", (sentence(), tags.Span("quote", (sentence(), tags.REDACTED)),
                                  " " + sentence()))]
        rng.shuffle(spans)
        docs.append(tags.serialize([spans[0], "\n", spans[1]]))
    return docs


def piece_classes(classes):
    """Token classes with each run of text merged into one: what `tags.token_classes`
    reads from the text those tokens decode to."""
    from prealign_jax import modes

    out = []
    for c in classes:
        if not (c == modes.TEXT and out and out[-1] == modes.TEXT):
            out.append(int(c))
    return out


def random_decoder(vocab_size, max_len):
    """(ModelConfig, numpy params) of a small random decoder (GQA) for sampling tests."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prealign_jax import model as model_lib

    cfg = model_lib.ModelConfig(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=None, mlp_dim=64, max_len=max_len)
    params = model_lib.Decoder(cfg).init(
        jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
    return cfg, jax.tree.map(np.asarray, nn.unbox(params))


@pytest.fixture(scope="session")
def spm_vocab(tmp_path_factory):
    """A 512-piece vocabulary trained on `sample_documents`."""
    from prealign_jax import vocab

    path = str(tmp_path_factory.mktemp("vocab") / "spm.model")
    vocab.train(sample_documents(400), path, vocab_size=512)
    return vocab.load(path)


@pytest.fixture(scope="module", autouse=True)
def _gin_bindings_stay_in_their_module():
    """Bindings a test module parses (main.parse_gin) must not configure the next module's
    tests. Cleared per module, not per test: module fixtures parse configs their tests
    then read."""
    yield
    import gin

    gin.clear_config()
