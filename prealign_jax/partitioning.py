"""Device mesh, logical-axis rules, and the shardings of parameters, state and batches.

Sharding is decided here and nowhere else (MaxText's habit): the model names the axes of
its parameters and activations (`batch, length, embed, mlp, heads, kv_heads, kv, vocab,
layers`), `LOGICAL_RULES` maps those names onto the mesh axes `('data', 'fsdp',
'tensor')`, and every jitted function gets explicit in/out shardings from the helpers
below. The same code runs on 1 CPU device, 8 fake CPU devices, a TPU pod or GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from prealign_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# In order of precedence; flax applies a rule only if its mesh axes are still unused by
# the array, so a weight's 'embed' is FSDP-sharded while an activation's 'embed' (whose
# 'batch' already took fsdp) stays replicated. Unlisted names are replicated.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("layers", None),
)


class MeshError(UserError):
    """A mesh shape that does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1: it takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"mesh ({named}): sizes must be positive, with at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(f"mesh ({named}): {num_devices} devices are not divisible "
                                f"by {known}; choose sizes whose product divides it")
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise MeshError(f"mesh ({named}) has {known} slots for {num_devices} devices; "
                            "make the product equal the device count or set one size to -1")
        return tuple(sizes)

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        shape = self.shape(len(devices))
        # Auto axes: shardings are propagated by the compiler from the constraints we give.
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all)."""
    return MeshConfig(data, fsdp, tensor).make(devices)


@contextlib.contextmanager
def activate(mesh: Mesh | AbstractMesh, rules=LOGICAL_RULES):
    """Context for tracing/running the model on `mesh`: sets the mesh (`jax.set_mesh`) and
    the logical-axis rules, so the model's activation constraints take effect. An
    AbstractMesh (axis sizes, no devices: `prealign plan`) supports tracing only."""
    if isinstance(mesh, AbstractMesh):
        setter = jax.sharding.use_abstract_mesh
    else:
        setter = jax.set_mesh
    with setter(mesh), nn.logical_axis_rules(rules):
        yield


def logical_specs(abstract_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree holding flax `LogicallyPartitioned` boxes (e.g.
    `jax.eval_shape(model.init, ...)` or a train state built from boxed params; optax
    states keep the boxes). Unboxed arrays get P() (replicated)."""
    return nn.get_partition_spec(abstract_tree)


def param_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for every array leaf of `abstract_tree` from its logical axes; the
    result has the *unboxed* structure (what `nn.unbox(tree)` gives). Works for the
    KV cache too: `param_shardings(model.abstract_cache(cfg, b, n), mesh)`."""
    return nn.logical_to_mesh_sharding(logical_specs(abstract_tree), mesh, rules)


def sharded_shapes(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """The unboxed ShapeDtypeStructs of an abstract (boxed) tree, each with its
    NamedSharding: what orbax restores into and what `.lower` compiles for."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract_tree), param_shardings(abstract_tree, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array ([B, ...]): rows over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding (scalars, metrics, RNG keys)."""
    return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (devices along the batch axes)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host-global batch (tree of [B, ...] arrays) on the mesh, rows split over
    the batch axes. Multi-host code builds it with
    `jax.make_array_from_process_local_data(batch_sharding(mesh), local)` instead."""
    multiple = batch_size_multiple(mesh)
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[0] % multiple:
            raise MeshError(f"batch size {leaf.shape[0]} is not divisible by the "
                            f"{multiple} devices of the mesh's ('data', 'fsdp') axes")
    return jax.device_put(batch, batch_sharding(mesh))
