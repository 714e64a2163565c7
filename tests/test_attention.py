"""Attention kernels: the blocked and splash kernels equal the masked-einsum reference (with
gradients) on packed causal batches, splash also per shard under a mesh, and `resolve` is
the one decision of what 'auto' runs on each platform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prealign_jax import attention, partitioning
from prealign_jax.errors import UserError


def _qkv(b, t, h, kv, hd=8):
    """q, k, v and an output cotangent in the model's layout ([B, T, heads, hd])."""
    return tuple(jax.random.normal(jax.random.key(i), (b, t, n, hd))
                 for i, n in enumerate((h, kv, kv, h)))


def _value_and_grads(impl, q, k, v, dout, segments):
    def loss(q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, segments, impl) * dout)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)


def _assert_close(got, ref, atol):
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=atol, rtol=1e-5), got, ref)


@pytest.mark.parametrize("t, kv", [(48, 2), (40, 4)])
def test_blocked_attention_matches_masked_einsum_with_gradients(t, kv):
    q, k, v, dout = _qkv(2, t, 4, kv)
    segments = jnp.array([[1] * 20 + [2] * (t - 24) + [0] * 4, [3] * t])
    ref = _value_and_grads("einsum", q, k, v, dout, segments)
    _assert_close(_value_and_grads("blocked", q, k, v, dout, segments), ref, 2e-5)
    assert attention._block_size(t) < t  # more than one block, so block skipping is exercised


# Splash runs in Pallas interpret mode on CPU. T = 256 is two 128-blocks (blocks above the
# diagonal skipped, segment boundaries inside and across blocks); T = 100 is padded to 128.
@pytest.mark.parametrize("t", [256, 100])
def test_splash_attention_matches_masked_einsum_with_gradients(t):
    q, k, v, dout = _qkv(2, t, 4, 2, hd=16)
    segments = jnp.array([[1] * 60 + [2] * (t - 76) + [0] * 16, [1] * 9 + [2] * (t - 9)])
    ref = _value_and_grads("einsum", q, k, v, dout, segments)
    _assert_close(_value_and_grads("splash", q, k, v, dout, segments), ref, 5e-4)


def test_splash_attention_runs_per_shard_under_a_mesh():
    """Rows split over ('data', 'fsdp') and heads over 'tensor': the kernel sees its
    shard only (a shard_map), and the result is the unsharded one."""
    q, k, v, _ = _qkv(4, 128, 4, 2, hd=16)
    segments = jnp.array([[1] * 128, [1] * 50 + [2] * 78, [0] * 128, [5] * 100 + [0] * 28])
    run = jax.jit(functools.partial(attention.causal_attention, segment_ids=segments,
                                    impl="splash"))
    with partitioning.activate(partitioning.make_mesh(data=2, fsdp=2, tensor=2)):
        jaxpr = jax.make_jaxpr(run)(q, k, v)
        got = run(q, k, v)
    assert "shard_map" in str(jaxpr)
    np.testing.assert_allclose(got, attention.causal_attention(q, k, v, segments, "einsum"),
                               atol=1e-5)


@pytest.mark.parametrize("impl, platform, dtype, expect", [
    ("auto", "cpu", "float32", "blocked"), ("auto", "cpu", "bfloat16", "blocked"),
    ("auto", "gpu", "bfloat16", "cudnn"), ("auto", "gpu", "float16", "cudnn"),
    ("auto", "gpu", "float32", "xla"),
    ("auto", "tpu", "bfloat16", "splash"), ("auto", "tpu", "float32", "splash"),
    ("einsum", "tpu", "bfloat16", "einsum"), ("xla", "gpu", "bfloat16", "xla"),
    ("splash", "cpu", "float32", "splash")])
def test_resolve_auto_per_platform_and_dtype(impl, platform, dtype, expect):
    assert attention.resolve(impl, platform, jnp.dtype(dtype)) == expect


@pytest.mark.parametrize("impl, platform, match", [
    ("flash", "tpu", "'flash': use one of"), ("splash", "gpu", "'splash' does not run on gpu"),
    ("cudnn", "cpu", "'cudnn' does not run on cpu")])
def test_a_kernel_that_cannot_run_is_a_one_line_error_naming_the_binding(impl, platform,
                                                                         match):
    with pytest.raises(UserError, match=rf"^ModelConfig.attention={match}") as err:
        attention.resolve(impl, platform, jnp.bfloat16)
    assert "\n" not in str(err.value)
