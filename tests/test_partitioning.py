"""Mesh construction and sharding: the same parameters and batch give the same logits,
loss and gradients on every mesh shape (8 fake CPU devices, set in conftest)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from prealign_jax import model as M
from prealign_jax import partitioning
from prealign_jax.errors import UserError

CFG = M.ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=None, mlp_dim=64, max_len=16)


def test_mesh_fills_the_minus_one_axis():
    assert partitioning.MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert partitioning.MeshConfig(data=1, fsdp=-1).shape(8) == (1, 8, 1)
    mesh = partitioning.make_mesh(fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("sizes", [(3, 1, 1), (-1, 3, 1), (-1, -1, 1), (0, 8, 1)])
def test_bad_mesh_is_a_user_error(sizes):
    with pytest.raises(UserError, match="mesh"):
        partitioning.MeshConfig(*sizes).shape(8)


def test_rules_shard_weights_over_fsdp_and_tensor_but_not_activation_embed():
    rules = partitioning.LOGICAL_RULES
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert nn.logical_to_mesh_axes(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert nn.logical_to_mesh_axes(M.ACT_EMBED, rules) == P(("data", "fsdp"), None, None)
    assert nn.logical_to_mesh_axes(M.ACT_HEADS, rules) == P(("data", "fsdp"), None,
                                                            "tensor", None)


def _batch(b=8, t=16):
    tokens = jax.random.randint(jax.random.key(1), (b, t), 3, CFG.vocab_size, jnp.int32)
    segments = jnp.concatenate([jnp.ones((b, 10), jnp.int32), jnp.full((b, 4), 2),
                                jnp.zeros((b, 2), jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(10), jnp.arange(4), jnp.zeros(2, jnp.int32)])
    return {"tokens": tokens, "positions": jnp.broadcast_to(positions, (b, t)),
            "segment_ids": segments}


def _logits_loss_grads(cfg, mesh, host_params, host_batch):
    """Shard params by their logical axes and the batch over ('data', 'fsdp'); run a jitted
    forward + backward with explicit in/out shardings."""
    decoder = M.Decoder(cfg)
    abstract = jax.eval_shape(decoder.init, jax.random.key(0), host_batch["tokens"],
                              host_batch["positions"], host_batch["segment_ids"])
    p_shard = partitioning.param_shardings(abstract, mesh)["params"]
    b_shard = partitioning.batch_sharding(mesh)

    def loss_fn(params, batch):
        logits = decoder.apply({"params": params}, batch["tokens"], batch["positions"],
                               batch["segment_ids"])
        weights = (batch["segment_ids"] > 0).astype(jnp.float32)
        targets = jnp.roll(batch["tokens"], -1, axis=1)
        loss = (M.cross_entropy(logits, targets) * weights).sum() / weights.sum()
        return loss, logits

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                   in_shardings=(p_shard, b_shard),
                   out_shardings=((partitioning.replicated(mesh), b_shard), p_shard))
    with partitioning.activate(mesh):
        params = jax.device_put(host_params, p_shard)
        batch = partitioning.shard_batch(host_batch, mesh)
        (loss, logits), grads = step(params, batch)
    return params, loss, logits, grads


@pytest.mark.parametrize("scan, meshes", [(False, [(8, 1, 1), (1, 8, 1), (2, 2, 2)]),
                                          (True, [(2, 2, 2)])])
def test_same_logits_loss_and_grads_on_every_mesh(scan, meshes):
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    batch = _batch()
    abstract = jax.eval_shape(M.Decoder(cfg).init, jax.random.key(0), batch["tokens"],
                              batch["positions"], batch["segment_ids"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3 + (s.ndim == 1),
                                                s.dtype), nn.unbox(abstract)["params"])
    single = partitioning.make_mesh(devices=jax.devices()[:1])
    _, ref_loss, ref_logits, ref_grads = _logits_loss_grads(cfg, single, params, batch)
    for sizes in meshes:
        mesh = partitioning.make_mesh(*sizes)
        sharded, loss, logits, grads = _logits_loss_grads(cfg, mesh, params, batch)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5), grads,
                     ref_grads)
        assert logits.sharding.spec == P(("data", "fsdp"))
        mlp_in = sharded["layers"]["mlp"]["wi"] if scan else sharded["layers_0"]["mlp"]["wi"]
        layer_axis = (None,) if scan else ()
        assert mlp_in.sharding.spec == P(*layer_axis, "fsdp", None, "tensor")


def test_shard_batch_rejects_indivisible_batch():
    mesh = partitioning.make_mesh(data=4, fsdp=2)
    assert partitioning.batch_size_multiple(mesh) == 8
    with pytest.raises(UserError, match="batch size 6"):
        partitioning.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)


def test_cache_shardings_follow_logical_axes():
    mesh = partitioning.make_mesh(data=4, tensor=2)
    abstract = M.abstract_cache(CFG, batch=4, max_len=16)
    shardings = partitioning.param_shardings(abstract, mesh)
    spec = shardings["layers_0"]["attention"]["cached_key"].spec
    assert spec == P(("data", "fsdp"), "tensor", None, None)
    cache = jax.device_put(M.init_cache(CFG, 4, 16), shardings)
    assert cache["layers_1"]["attention"]["cached_value"].sharding.spec == spec
