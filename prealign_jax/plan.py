"""`prealign plan`: per-device memory, FLOPs and step time of a model on a mesh, from
abstract shapes alone (nothing is allocated), so a laptop can plan an 8B run on a pod.

    prealign plan --gin_file=models/8b.gin --gin_file=meshes/tpu_v5p-256.gin [--mfu=0.5]

The mesh file names the hardware (`Accelerator`: device count, HBM, peak bf16 FLOP/s).
Per device, in the order the train step holds them:

- parameters, optimizer state: exact, from `train.Steps` built on an `AbstractMesh` of
  the target's shape: the very shardings training uses (`partitioning.param_shardings`),
  summed with `NamedSharding.shard_shape`.
- gradients: one parameter-shaped tree, sharded like the parameters; with
  `accum_steps > 1`, a float32 accumulator plus one micro-batch's gradients.
- activations: the residuals `jax.vjp` saves between the forward and the backward pass
  of one device's share of a micro-batch, under the model's remat policy — traced on the
  per-device program (batch rows / (data·fsdp); heads, MLP and vocabulary / tensor), with
  the attention kernel `attention.resolve` picks for the target (cuDNN, which cannot be
  traced off a GPU, is modelled: see `saved_bytes`).
- backward working set: the larger of (a) one layer rematerialised in the backward pass
  (its residuals without remat; 0 with remat 'none', whose residuals are all counted
  above) and (b) the loss head's float32 logit gradient and softmax, 2·b·T·V/tensor·4 B.
- gathered weights (FSDP): the largest weight block all-gathered for a matmul (one
  layer, the embedding or the output projection), in the compute dtype, plus its
  gradient before the reduce-scatter.

XLA's own temporaries, fusion and padding differ by backend, so the total is a planning
figure: against XLA:CPU's buffer assignment of the real train step (`--compile`, see
`compile_check`) the state matched exactly and the rest came within -27%..+50% on the
configurations compared (8B on 128 devices: -13%). A total above 80% of HBM is reported
as tight.

FLOPs are model FLOPs (`model.flops_per_token`: 6·N + attention, what MFU is measured
against); the step time at a given MFU is FLOPs / (devices · peak · MFU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core
from jax.sharding import AbstractMesh, AxisType

from prealign_jax import attention, modes, partitioning, train
from prealign_jax import model as model_lib
from prealign_jax.errors import UserError

GIB = 2 ** 30
TIGHT = 0.8  # of HBM: above it, the estimate's error may decide


class PlanError(UserError):
    """A model / mesh / batch combination that cannot be laid out (names the binding)."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """The hardware a mesh file describes (gin/meshes/*.gin), as the planner needs it.

    `num_devices`: JAX devices of the slice (TPU: chips; GPU: GPUs); None plans for
    `train.num_cpu_devices` if bound, else this machine's devices. `hbm_bytes`: memory of
    one device. `peak_flops`: dense bf16 FLOP/s of one device. `platform` ('cpu' | 'gpu' |
    'tpu') decides what `ModelConfig.attention='auto'` becomes (`attention.resolve`).
    """

    name: str = "this machine"
    num_devices: int | None = None
    hbm_bytes: float | None = None
    peak_flops: float | None = None
    platform: str = "cpu"

    def __post_init__(self):
        n = self.num_devices
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise PlanError(f"Accelerator.num_devices={n!r}: a positive integer, or None")
        for field in ("hbm_bytes", "peak_flops"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise PlanError(f"Accelerator.{field}={v!r}: a positive number, or None")
        if self.platform not in ("cpu", "gpu", "tpu"):
            raise PlanError(f"Accelerator.platform={self.platform!r}: 'cpu', 'gpu' or 'tpu'")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of each memory term, and the step's model FLOPs."""

    model: model_lib.ModelConfig
    accelerator: Accelerator
    mesh_shape: dict[str, int]
    batch_size: int
    seq_len: int
    accum_steps: int
    attention: str
    parameters: int
    optimizer_state: int
    gradients: int
    activations: int
    working_set: int
    gathered_weights: int
    flops_per_step: float

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def rows_per_device(self) -> int:
        """Sequences of one micro-batch on one device."""
        return self.batch_size // (self.mesh_shape["data"] * self.mesh_shape["fsdp"]
                                   * self.accum_steps)

    @property
    def total(self) -> int:
        return (self.parameters + self.optimizer_state + self.gradients + self.activations
                + self.working_set + self.gathered_weights)

    @property
    def fits(self) -> bool | None:
        """Whether the total fits the device memory (None: memory unknown)."""
        return None if self.accelerator.hbm_bytes is None else (
            self.total <= self.accelerator.hbm_bytes)

    def step_seconds(self, mfu: float) -> float | None:
        peak = self.accelerator.peak_flops
        return None if not peak else self.flops_per_step / (self.num_devices * peak * mfu)

    def describe(self, mfu: float) -> str:
        cfg, acc = self.model, self.accelerator
        mesh = _mesh_text(self.mesh_shape)
        lines = [
            f"model: {model_lib.num_params(cfg) / 1e9:.3g}B parameters ({cfg.num_layers} "
            f"layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}) | remat {cfg.remat} | "
            f"attention {self.attention} | {cfg.dtype} compute, {cfg.param_dtype} weights",
            f"hardware: {acc.name} x {self.num_devices} | mesh {mesh}",
            f"batch: {self.batch_size} x {self.seq_len} tokens, accum_steps "
            f"{self.accum_steps}: {self.rows_per_device} sequence(s) per device per "
            "micro-batch",
            "memory per device:"]
        terms = (("parameters", self.parameters), ("optimizer state", self.optimizer_state),
                 ("gradients", self.gradients), ("activations (saved for backward)",
                                                 self.activations),
                 ("backward working set", self.working_set),
                 ("gathered weights (FSDP)", self.gathered_weights))
        lines += [f"  {name:<34}{value / GIB:>10.2f} GiB" for name, value in terms]
        total = f"  {'total':<34}{self.total / GIB:>10.2f} GiB"
        if acc.hbm_bytes:
            verdict = ("DOES NOT FIT" if not self.fits else "fits"
                       if self.total <= TIGHT * acc.hbm_bytes else "tight: may not fit")
            total += (f"  = {self.total / acc.hbm_bytes:.0%} of {acc.hbm_bytes / GIB:.1f} GiB:"
                      f" {verdict}")
        lines.append(total)
        tokens = self.batch_size * self.seq_len
        lines.append(f"compute: {self.flops_per_step:.3e} FLOPs per step "
                     f"({self.flops_per_step / tokens / 1e9:.3g} GFLOP per token)")
        seconds = self.step_seconds(mfu)
        if seconds is None:
            lines.append("step time: unknown (no peak FLOP/s: set Accelerator.peak_flops)")
        else:
            lines.append(f"step time at {mfu:.0%} MFU: {seconds:.3g} s | "
                         f"{tokens / seconds:,.0f} tokens/s | "
                         f"{tokens / seconds / self.num_devices:,.0f} tokens/s per device")
        return "\n".join(lines)


def abstract_mesh(mesh: partitioning.MeshConfig, num_devices: int) -> AbstractMesh:
    """The ('data', 'fsdp', 'tensor') mesh of `num_devices` devices, without devices."""
    return AbstractMesh(mesh.shape(num_devices), partitioning.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(partitioning.MESH_AXES))


def make_plan(model: model_lib.ModelConfig, mesh: partitioning.MeshConfig,
              accelerator: Accelerator, batch_size: int, seq_len: int | None = None,
              accum_steps: int = 1,
              optimizer: train.OptimizerConfig = train.OptimizerConfig()) -> Plan:
    """Plan one training step of `model` on `accelerator.num_devices` devices laid out
    by `mesh` (see the module docstring for each term)."""
    seq_len = seq_len or model.max_len
    if accelerator.num_devices is None:
        raise PlanError("Accelerator.num_devices is not set: bind it (a mesh file of "
                        "gin/meshes/ does) or plan for this machine's devices")
    amesh = abstract_mesh(mesh, accelerator.num_devices)
    shape = dict(amesh.shape)
    batch_devices = shape["data"] * shape["fsdp"]
    if batch_size % (batch_devices * accum_steps):
        raise PlanError(f"batch size {batch_size} must be a multiple of {batch_devices * accum_steps}"
                        f" (data x fsdp devices x accum_steps={accum_steps})")
    steps = train.Steps(model, train.make_optimizer(optimizer, 1),
                        train.learning_rate_schedule(optimizer, 1), amesh,
                        np.full(model.vocab_size, modes.TEXT, np.int32))
    state = steps.abstract_state
    param_bytes, opt_bytes = _shard_bytes(state.params), _shard_bytes(state.opt_state)
    local = local_config(model, shape["tensor"], accelerator.platform)
    rows = batch_size // (batch_devices * accum_steps)
    param_elems = param_bytes // jnp.dtype(model.param_dtype).itemsize
    gradients = param_elems * 4 * 2 if accum_steps > 1 else param_bytes
    logits_grad = 2 * rows * seq_len * local.vocab_size * 4
    if model.remat == "none":
        layer = 0
    else:
        bare = dataclasses.replace(local, remat="none", scan_layers=False)
        layer = (saved_bytes(dataclasses.replace(bare, num_layers=1), rows, seq_len)
                 - saved_bytes(dataclasses.replace(bare, num_layers=0), rows, seq_len))
    return Plan(model=model, accelerator=accelerator, mesh_shape=shape,
                batch_size=batch_size, seq_len=seq_len, accum_steps=accum_steps,
                attention=local.attention, parameters=param_bytes,
                optimizer_state=opt_bytes, gradients=gradients,
                activations=saved_bytes(local, rows, seq_len),
                working_set=max(layer, logits_grad),
                gathered_weights=_gathered_bytes(state.params, model, shape),
                flops_per_step=model_lib.flops_per_token(model, seq_len) * batch_size
                * seq_len)


def local_config(cfg: model_lib.ModelConfig, tensor: int,
                 platform: str) -> model_lib.ModelConfig:
    """One device's share of a tensor-parallel model (heads, kv heads, MLP and vocabulary
    divided by `tensor`), with its attention kernel resolved for `platform`."""
    def split(name):
        n = getattr(cfg, name)
        if n % tensor:
            raise PlanError(f"ModelConfig.{name}={n} is not divisible by MeshConfig.tensor="
                            f"{tensor}")
        return n // tensor

    return dataclasses.replace(cfg, head_dim=cfg.dims_per_head, num_heads=split("num_heads"),
                               num_kv_heads=split("num_kv_heads"), mlp_dim=split("mlp_dim"),
                               vocab_size=split("vocab_size"),
                               attention=attention.resolve(cfg.attention, platform, cfg.dtype))


@functools.cache
def saved_bytes(cfg: model_lib.ModelConfig, rows: int, seq_len: int) -> int:
    """Bytes of the residuals `jax.vjp` keeps for the backward pass of the training loss
    on a [rows, seq_len] batch (parameters and inputs, held anyway, not counted).

    "cudnn" cannot be traced off a GPU: it keeps what "blocked" keeps (q, k, v, output,
    log-sum-exp; no [T, T] scores), plus the segment mask that jax.nn.dot_product_attention
    hands cuDNN as a [rows, 1, T, T] bias in the compute dtype; one copy (every layer's is
    the same), kept unless remat recomputes the attention."""
    if cfg.attention == "cudnn":
        bias = (rows * seq_len ** 2 * jnp.dtype(cfg.dtype).itemsize
                if cfg.remat == "none" and cfg.num_layers else 0)
        return saved_bytes(dataclasses.replace(cfg, attention="blocked"), rows, seq_len) + bias
    model = model_lib.Decoder(cfg)
    params = nn.unbox(model_lib.abstract_params(cfg))
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k ==
                                     "decoder_loss_weights" else jnp.int32)
             for k in train.FEATURES}
    loss = functools.partial(train.loss_and_metrics, model=model, z_loss=0.0,
                             token_class=np.full(cfg.vocab_size, modes.TEXT, np.int32))
    closed, shapes = jax.make_jaxpr(
        lambda p, b: jax.vjp(lambda q: loss(q, b)[0], p), return_shape=True)(params, batch)
    jaxpr = closed.jaxpr
    residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(shapes[1])):]
    inputs, seen, total = set(jaxpr.invars), set(), 0
    for v in residuals:
        if isinstance(v, jax_core.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        total += v.aval.size * v.aval.dtype.itemsize
    return total


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of every array in `tree` (abstract, with shardings)."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        spec = x.sharding.spec
        for size, axes in zip(x.shape, spec):
            ways = math.prod(x.sharding.mesh.shape[a] for a in
                             ((axes,) if isinstance(axes, str) else axes or ()))
            if size % ways:
                raise PlanError(
                    f"the mesh ({_mesh_text(x.sharding.mesh.shape)}) cannot shard "
                    f"{jax.tree_util.keystr(path)} {x.shape}: {axes}={ways} does not divide "
                    f"{size}; use axis sizes that divide the model's dimensions (e.g. fewer "
                    "devices on MeshConfig.fsdp and the rest on MeshConfig.data)")
        total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def _mesh_text(shape) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _gathered_bytes(params, cfg: model_lib.ModelConfig, shape: dict[str, int]) -> int:
    """The largest weight block FSDP all-gathers (one layer, the embedding or the output
    projection; still split over 'tensor'), in the compute dtype, twice: the weights and
    their gradient before its reduce-scatter."""
    if shape["fsdp"] == 1:
        return 0
    sizes = {"layer": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        top = path[0].key
        if top.startswith("layers"):
            sizes["layer"] += leaf.size
        elif top != "final_norm":
            sizes[top] = leaf.size
    sizes["layer"] //= cfg.num_layers
    return 2 * max(sizes.values()) // shape["tensor"] * jnp.dtype(cfg.dtype).itemsize


def compile_check(plan: Plan) -> dict[str, float]:
    """Compile the real train step for the plan's mesh on fake CPU devices and return
    XLA:CPU's per-device buffer sizes in bytes (arguments = state + batch, temporaries).

    Needs `plan.num_devices` CPU devices (the `prealign plan --compile` process sets
    them up before JAX starts); minutes for billions of parameters. XLA:CPU fuses and
    schedules differently from TPU/GPU, and 'auto' attention compiles as 'blocked' here.
    """
    devices = jax.devices()
    if len(devices) < plan.num_devices:
        raise PlanError(f"--compile needs {plan.num_devices} devices; this process has "
                        f"{len(devices)}")
    cfg = plan.model
    mesh = partitioning.MeshConfig(**plan.mesh_shape).make(devices[:plan.num_devices])
    opt = train.OptimizerConfig()
    steps = train.Steps(cfg, train.make_optimizer(opt, 1), train.learning_rate_schedule(opt, 1),
                        mesh, np.full(cfg.vocab_size, modes.TEXT, np.int32),
                        accum_steps=plan.accum_steps)
    sharding = partitioning.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((plan.batch_size, plan.seq_len), jnp.float32 if k ==
                                     "decoder_loss_weights" else jnp.int32, sharding=sharding)
             for k in train.FEATURES}
    with partitioning.activate(mesh):
        stats = steps.train.lower(steps.abstract_state, batch).compile().memory_analysis()
    return {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
