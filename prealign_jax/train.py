"""Training: state, optimizer, the conditional-token loss with per-mode metrics, the jitted
steps, the loop, and the `prealign train` entry point.

The jitted core (`loss_and_metrics`, `Steps`) is pure: no gin, no I/O. Gin configures the
edge only: `train` (the command) and the dataclasses it takes (`ModelConfig`,
`MeshConfig`, `OptimizerConfig`), registered here. The state is initialised directly into
its shardings (a jit of init with `out_shardings`), so no host ever holds a full replica.

Loss: sum(w · CE) / sum(w) with the batch's float `decoder_loss_weights` w (per-mode and
tag weights, 0 on padding), tags included; optional z-loss z · sum(w · logsumexp²) / sum(w).
With gradient accumulation the sums run over all micro-batches before the division, so
the update equals the one of a single large batch. Per-mode metrics are *unweighted* mean
CE and token counts of the target tokens read in each mode (text tokens of doc, human,
ai, quote; tags; EOS), with modes from `modes.run_jax` on the targets' token classes.

Host sync happens only at log, eval and checkpoint steps: per-step metrics stay on device
until then. A non-finite loss stops the run before any checkpoint of the diverged state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prealign_jax import checkpointing, modes, multihost, partitioning, vocab
from prealign_jax import model as model_lib
from prealign_jax.data import pipeline
from prealign_jax.errors import UserError

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
            "decoder_positions", "decoder_loss_weights")

# Metric groups of target tokens: text read in each mode, every tag, EOS.
GROUPS = ("doc", "human", "ai", "quote", "tag", "eos")
# Per-step sums; everything else a step returns (grad_norm, learning_rate) is averaged.
_SUM_KEYS = ("loss_sum", "weight_sum", "z_sum", "tokens") + tuple(
    f"{kind}/{g}" for g in GROUPS for kind in ("ce_sum", "count"))


class TrainError(UserError):
    """A training configuration or run that cannot go on (names the binding to change)."""


# ---------------------------------------------------------------- state and optimizer
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a linear-warmup + cosine learning rate.

    `decay_steps` None means the run's `num_steps`; the rate falls from `learning_rate` to
    `learning_rate * end_learning_rate_fraction`. Weight decay skips vectors (norm scales,
    biases) and, unless `decay_embeddings`, the embedding table.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    end_learning_rate_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    decay_embeddings: bool = False


def learning_rate_schedule(cfg: OptimizerConfig, num_steps: int) -> optax.Schedule:
    decay_steps = cfg.decay_steps or num_steps
    warmup = min(cfg.warmup_steps, decay_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_fraction)


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves weight decay applies to: matrices, but not the embedding table
    (unless `decay_embeddings`). Works on boxed (logically partitioned) trees too."""

    def decays(path, x):
        names = {getattr(k, "key", None) for k in path}
        return x.ndim >= 2 and (decay_embeddings or "embedding" not in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                    eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=functools.partial(weight_decay_mask,
                                           decay_embeddings=cfg.decay_embeddings)))


# ---------------------------------------------------------------- loss and metrics
def token_groups(targets, segment_ids, token_class):
    """bool [G, B, T]: membership of each target token in `GROUPS` (padding in none)."""
    classes = jnp.asarray(token_class)[targets]
    mode_ids, _, _ = modes.run_jax(modes.GRAMMAR.compile(), classes, segment_ids)
    real = segment_ids != 0
    text = real & (classes == modes.TEXT)
    by_mode = [text & (mode_ids == modes.MODES.index(m)) for m in GROUPS[:4]]
    tag = real & (classes >= 1) & (classes <= len(modes.TAGS))
    eos = real & (classes == modes.EOS_CLASS)
    return jnp.stack(by_mode + [tag, eos])


def loss_and_metrics(params, batch, *, model: nn.Module, token_class, z_loss: float):
    """(weighted loss *sum* to differentiate, dict of per-batch metric sums)."""
    targets = batch["decoder_target_tokens"]
    segment_ids = batch["decoder_segment_ids"]
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    logits = model.apply({"params": params}, batch["decoder_input_tokens"],
                         batch["decoder_positions"], segment_ids)
    ce = model_lib.cross_entropy(logits, targets)
    loss_sum = jnp.sum(weights * ce)
    z_sum = jnp.sum(weights * jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    objective = loss_sum + z_loss * z_sum if z_loss else loss_sum
    groups = token_groups(targets, segment_ids, token_class)
    metrics = {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights), "z_sum": z_sum,
               "tokens": jnp.sum(segment_ids != 0).astype(jnp.float32)}
    ce_by_group = jnp.sum(jnp.where(groups, ce, 0.0), axis=(1, 2))
    count_by_group = jnp.sum(groups, axis=(1, 2)).astype(jnp.float32)
    for i, g in enumerate(GROUPS):
        metrics[f"ce_sum/{g}"] = ce_by_group[i]
        metrics[f"count/{g}"] = count_by_group[i]
    return objective, metrics


# ---------------------------------------------------------------- jitted steps
class Steps:
    """The jitted init / train / eval functions of one model on one mesh.

    `init(rng) -> TrainState` (created in its shardings), `train(state, batch) -> (state,
    metrics)` (state donated), `evaluate(params, batch) -> metrics`. Batches are dicts of
    global [B, T] arrays with `FEATURES`, sharded by `partitioning.batch_sharding`. The
    global batch is split into `accum_steps` micro-batches (row i goes to micro-batch
    i mod accum_steps) whose gradients are summed before one update.
    """

    def __init__(self, model_cfg: model_lib.ModelConfig, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, mesh, token_class: np.ndarray, *,
                 z_loss: float = 0.0, accum_steps: int = 1):
        self.mesh = mesh
        self.model = model_lib.Decoder(model_cfg)
        self._tx, self._schedule, self._accum = tx, schedule, accum_steps
        self._loss = functools.partial(loss_and_metrics, model=self.model,
                                       token_class=np.asarray(token_class, np.int32),
                                       z_loss=z_loss)
        with partitioning.activate(mesh):
            boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
            self.state_shardings = partitioning.param_shardings(boxed, mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.unbox(boxed), self.state_shardings)
        batch_sh = partitioning.batch_sharding(mesh)
        metrics_sh = partitioning.replicated(mesh)
        self.init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                            out_shardings=self.state_shardings)
        self.train = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh),
                             out_shardings=(self.state_shardings, metrics_sh),
                             donate_argnums=0)
        self.evaluate = jax.jit(lambda params, batch: self._loss(params, batch)[1],
                                in_shardings=(self.state_shardings.params, batch_sh),
                                out_shardings=metrics_sh)

    def _init_boxed(self, rng) -> TrainState:
        dummy = jnp.zeros((partitioning.batch_size_multiple(self.mesh), 1), jnp.int32)
        params = self.model.init(rng, dummy, dummy, dummy + 1)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self._tx.init(params))

    def _train_step(self, state: TrainState, batch):
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if self._accum == 1:
            (_, sums), grads = grad_fn(state.params, batch)
        else:
            micro_sh = jax.sharding.NamedSharding(
                self.mesh, jax.sharding.PartitionSpec(None, partitioning.BATCH_AXES))

            def split(x):  # [B, T] -> [A, B/A, T]; each device keeps its own rows
                x = x.reshape(x.shape[0] // self._accum, self._accum, *x.shape[1:])
                return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_sh)

            def body(carry, micro):
                (_, sums), grads = grad_fn(state.params, micro)
                grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
                     {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS})
            (grads, sums), _ = jax.lax.scan(body, zeros, jax.tree.map(split, batch))
        norm = jnp.maximum(sums["weight_sum"], 1e-9)
        grads = jax.tree.map(lambda g: g / norm, grads)
        updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(sums, grad_norm=optax.tree.norm(grads),
                       learning_rate=self._schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---------------------------------------------------------------- metrics on the host
def summarize(step_metrics: list[dict]) -> dict[str, float]:
    """Fold fetched per-step metrics (sums) into means over the steps: `loss` (weighted
    CE), `z_loss`, `loss/<group>` (unweighted CE), `tokens/<group>`, `grad_norm`, ..."""
    total = {k: float(sum(m[k] for m in step_metrics)) for k in _SUM_KEYS}
    weight = max(total["weight_sum"], 1e-9)
    out = {"loss": total["loss_sum"] / weight, "z_loss": total["z_sum"] / weight,
           "tokens": total["tokens"]}
    for g in GROUPS:
        count = total[f"count/{g}"]
        out[f"tokens/{g}"] = count
        if count:
            out[f"loss/{g}"] = total[f"ce_sum/{g}"] / count
    for k in step_metrics[0]:
        if k not in _SUM_KEYS:
            out[k] = float(np.mean([m[k] for m in step_metrics]))
    return out


class MetricWriter:
    """Console lines, TensorBoard events (`<workdir>/tensorboard`) and `metrics.jsonl`.

    Only process 0 writes. On resume, records after the restored step (written by the
    interrupted run, about to be recomputed) are dropped from metrics.jsonl and purged
    from TensorBoard, so each step appears once.
    """

    def __init__(self, workdir: str, start_step: int):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self._jsonl):
            with open(self._jsonl) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
            with open(self._jsonl, "w") as f:
                f.writelines(kept)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, scalars: dict[str, float], line: str | None = None) -> None:
        if not self._active:
            return
        if line:
            print(line, flush=True)
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._active:
            self._tb.close()


def _console_line(step: int, num_steps: int, s: dict[str, float]) -> str:
    parts = [f"step {step}/{num_steps}", f"loss {s['loss']:.4f}"]
    parts += [f"{k} {s[k]:,.0f}" if k == "tokens/s" else f"{k} {s[k]:.1%}" if k == "mfu"
              else f"{k} {s[k]:.3g}" for k in ("tokens/s", "mfu", "learning_rate", "grad_norm")
              if k in s]
    parts += [f"{g} {s['loss/' + g]:.3f}" for g in GROUPS if f"loss/{g}" in s]
    return " | ".join(parts)


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted n x n matmul on the default device, the fastest of `repeats`
    (a peak: on a shared machine slow repeats measure the neighbours, not the chip): the
    MFU reference when no peak is configured, and bench/train_throughput.py's."""
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(x, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x, x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def job_peak_flops(peak_flops_per_device: float | None) -> float:
    """Peak FLOP/s of the whole job. A measured CPU peak already spans the host's cores
    (all fake CPU devices share them); other measured or given peaks are per device."""
    if peak_flops_per_device:
        return peak_flops_per_device * jax.device_count()
    measured = measure_matmul_peak()
    if jax.default_backend() == "cpu":
        return measured * jax.process_count()
    return measured * jax.device_count()


# ---------------------------------------------------------------- data
@dataclasses.dataclass
class DataSources:
    """What the loop reads: for each data shard this process reads (`seqio.ShardInfo` ->
    tf.data dataset of packed batches, `FEATURES`, [batch_size / num_shards, seq_len];
    see `multihost.data_shards`), and the vocabulary's `token_class[V]`.

    `train` is endless and deterministic (each shard's iterator position is
    checkpointed); `eval`, if given, is endless too and re-read from its start at every
    evaluation."""

    train: Any
    eval: Any | None
    token_class: np.ndarray


@gin.configurable(denylist=["workdir", "batch_size", "seq_len", "seed"])
def seqio_data(workdir: str, batch_size: int, seq_len: int, seed: int, *,
               data_dir: str | None = None, mixture_or_task: str = "prealign",
               eval_split: str | None = "validation",
               num_data_shards: int | None = None) -> DataSources:
    """The trainer's data from the seqio pipeline (`data.pipeline.get_dataset`, which holds
    the loss weights); each process reads its own data shards (files, or records where a
    split has fewer files than shards).

    `data_dir` defaults to `<workdir>/data`, where `prepare --workdir` writes.
    `num_data_shards` (None: one per process) fixes the global batch's composition: keep
    it when resuming on another number of processes (it must be a multiple of it)."""
    import seqio

    shards = multihost.data_shards(num_data_shards)
    if batch_size % shards[0].num_shards:
        raise TrainError(f"train.batch_size={batch_size} must be a multiple of "
                         f"seqio_data.num_data_shards={shards[0].num_shards}")
    per_shard = batch_size // shards[0].num_shards
    data_dir = data_dir or os.path.join(workdir, "data")

    def datasets(split):
        return {shard: pipeline.get_dataset(mixture_or_task, split, per_shard, seq_len, seed,
                                            shard_info=shard, data_dir=data_dir)
                for shard in shards}

    train_ds = datasets("train")  # registers the tasks of data_dir
    vocabulary = seqio.get_mixture_or_task(mixture_or_task).output_features[
        "targets"].vocabulary
    return DataSources(train=train_ds, eval=datasets(eval_split) if eval_split else None,
                       token_class=vocab.token_classes(vocabulary))


def _global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Process-local batch -> global jax.Arrays (rows of all processes, concatenated)."""
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in FEATURES}


# ---------------------------------------------------------------- the command
gin.external_configurable(model_lib.ModelConfig, "ModelConfig")
gin.external_configurable(partitioning.MeshConfig, "MeshConfig")


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *,
          model: model_lib.ModelConfig = gin.REQUIRED,
          num_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
          optimizer: OptimizerConfig = OptimizerConfig(),
          data: Callable[..., DataSources] = seqio_data,
          seq_len: int | None = None,
          accum_steps: int = 1,
          z_loss: float = 0.0,
          seed: int = 0,
          log_every: int = 10,
          eval_every: int = 0,
          eval_steps: int = 10,
          checkpoint_every: int = 1000,
          keep_checkpoints: int = 3,
          peak_flops_per_device: float | None = None,
          num_cpu_devices: int | None = None,
          distributed: dict | None = None) -> dict[str, float]:
    """Train (or resume from the latest checkpoint in `workdir/checkpoints`) to `num_steps`.

    Returns the metrics of the last log window. See gin/runs/*.gin for every parameter.
    `distributed`: None for one process; else one process per host, and the keyword
    arguments of `jax.distributed.initialize` ({} auto-detects Cloud TPU, SLURM, Open
    MPI, Kubernetes; elsewhere give coordinator_address, num_processes, process_id; on CPU
    also set JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo).
    """
    _use_cpu_devices(num_cpu_devices)
    if distributed is not None:
        multihost.initialize(distributed)
    seq_len = seq_len or model.max_len
    if seq_len > model.max_len:
        raise TrainError(f"train.seq_len={seq_len} exceeds ModelConfig.max_len="
                         f"{model.max_len}")
    device_mesh = mesh.make()
    _say(multihost.describe(device_mesh))
    _check_batch(batch_size, accum_steps, device_mesh)
    os.makedirs(workdir, exist_ok=True)
    sources = data(workdir, batch_size, seq_len, seed)
    token_class = vocab.model_token_classes(sources.token_class, model.vocab_size)
    steps = Steps(model, make_optimizer(optimizer, num_steps),
                  learning_rate_schedule(optimizer, num_steps), device_mesh, token_class,
                  z_loss=z_loss, accum_steps=accum_steps)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())
    peak = job_peak_flops(peak_flops_per_device)
    flops_per_step = model_lib.flops_per_token(model, seq_len) * batch_size * seq_len
    _say(f"model: {model_lib.num_params(model):,} parameters | mesh {dict(device_mesh.shape)}"
         f" | batch {batch_size} x {seq_len} | peak {peak / 1e9:,.1f} GFLOP/s")
    return _loop(workdir, steps, sources, num_steps=num_steps,
                 tokens_per_step=batch_size * seq_len, flops_per_step=flops_per_step,
                 peak=peak, log_every=log_every, eval_every=eval_every,
                 eval_steps=eval_steps, checkpoint_every=checkpoint_every,
                 keep_checkpoints=keep_checkpoints, seed=seed)


def _say(line: str) -> None:
    """A console line, from process 0 only."""
    if jax.process_index() == 0:
        print(line, flush=True)


def _use_cpu_devices(n: int | None) -> None:
    """Split the host CPU into `n` devices (a CPU-only mesh test); a no-op elsewhere."""
    if n is None or jax.config.jax_num_cpu_devices == n:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backend already up (e.g. XLA_FLAGS set the count): check it
        if jax.default_backend() == "cpu" and jax.local_device_count() != n:
            raise TrainError(f"train.num_cpu_devices={n}, but JAX already started with "
                             f"{jax.local_device_count()} CPU devices") from None


def _check_batch(batch_size: int, accum_steps: int, mesh) -> None:
    # (the batch axes' devices span every process: their count already divides by it)
    multiple = partitioning.batch_size_multiple(mesh) * accum_steps
    if batch_size % multiple:
        raise TrainError(
            f"train.batch_size={batch_size} must be a multiple of {multiple} (devices on the "
            f"mesh's data x fsdp axes x train.accum_steps={accum_steps})")


def _loop(workdir: str, steps: Steps, sources: DataSources, *, num_steps: int,
          tokens_per_step: int, flops_per_step: float, peak: float, log_every: int,
          eval_every: int, eval_steps: int, checkpoint_every: int, keep_checkpoints: int,
          seed: int) -> dict[str, float]:
    batch_sh = partitioning.batch_sharding(steps.mesh)
    ckpt = checkpointing.Checkpoints(workdir, checkpoint_every, keep_checkpoints)
    iterator = multihost.ShardedIterator(sources.train)
    start = ckpt.latest_step() or 0
    with partitioning.activate(steps.mesh):
        if start:
            state = ckpt.restore(start, steps.abstract_state, iterator)
            _say(f"resumed from {ckpt.directory}/{start}")
        else:
            state = steps.init(jax.random.key(seed))
        if start >= num_steps:
            _say(f"{ckpt.directory}/{start} is at or past train.num_steps={num_steps}; "
                 "nothing to train")
        writer = MetricWriter(workdir, start)
        pending: list[tuple[int, dict]] = []  # per-step metrics not fetched yet
        summary: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        try:
            for step in range(start + 1, num_steps + 1):
                state, metrics = steps.train(state, _global_batch(next(iterator), batch_sh))
                pending.append((step, metrics))
                window_steps += 1
                if step == start + 1:  # exclude compilation from the first window's rate
                    jax.block_until_ready(metrics)
                    window_start, window_steps = time.perf_counter(), 0
                preempted = ckpt.reached_preemption(step)
                last = step == num_steps or preempted
                saving = last or ckpt.should_save(step)
                if step % log_every == 0 or last or saving:
                    fetched = _fetch_finite(pending, ckpt)
                    if step % log_every == 0 or last:
                        summary = summarize(fetched)
                        elapsed = time.perf_counter() - window_start
                        if window_steps and elapsed > 0:
                            summary["tokens/s"] = window_steps * tokens_per_step / elapsed
                            summary["mfu"] = summary["tokens/s"] * (
                                flops_per_step / tokens_per_step) / peak
                        writer.write(step, summary, _console_line(step, num_steps, summary))
                        pending, window_start, window_steps = [], time.perf_counter(), 0
                    else:  # keep them for the next log line, now on the host
                        pending = [(s, m) for (s, _), m in zip(pending, fetched)]
                if sources.eval is not None and eval_every and (
                        step % eval_every == 0 or step == num_steps):
                    scalars = summarize(_evaluate(steps, state, sources.eval, eval_steps,
                                                  batch_sh))
                    writer.write(step, {f"eval/{k}": v for k, v in scalars.items()},
                                 f"eval step {step} | loss {scalars['loss']:.4f} | " + " | ".join(
                                     f"{g} {scalars['loss/' + g]:.3f}" for g in GROUPS
                                     if f"loss/{g}" in scalars))
                    window_start = time.perf_counter()  # the rate excludes evaluation
                if saving:
                    ckpt.save(step, state, iterator, force=last)
                    window_start = time.perf_counter()  # ... and the blocking part of saves
                if preempted:
                    _say(f"preempted: saved step {step} to {ckpt.directory}; rerun the "
                         "same command to resume")
                    break
        finally:
            ckpt.close()
            writer.close()
    return summary


def _fetch_finite(pending: list[tuple[int, dict]], ckpt) -> list[dict]:
    """Fetch pending per-step metrics; stop the run at the first non-finite loss."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, fetched):
        if not np.isfinite(m["loss_sum"]):
            raise TrainError(
                f"step {step}: the loss is {m['loss_sum']}; stopped without saving it (last "
                f"checkpoint: step {ckpt.latest_step()}). Lower OptimizerConfig.learning_rate "
                "or raise warmup_steps, or check the data")
    return fetched


def _evaluate(steps: Steps, state: TrainState, datasets, num_batches: int, batch_sh):
    iterator = multihost.ShardedIterator(datasets)
    return jax.device_get([steps.evaluate(state.params, _global_batch(next(iterator),
                                                                        batch_sh))
                           for _ in range(num_batches)])


def command(args) -> None:
    """`prealign train --workdir=DIR [--gin_file=runs/X.gin] [--gin.train.P=V ...]`."""
    if not args.workdir:
        raise TrainError("prealign train needs --workdir=DIR (checkpoints, metrics, config)")
    with multihost.fail_fast():  # a failed process must not leave its peers hanging
        train(args.workdir)
