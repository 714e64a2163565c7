"""Training: state, optimizer, the conditional-token loss with per-mode metrics, the jitted
steps and the loop (`train`, what `prealign train` calls).

The jitted core (`loss_and_metrics`, `Steps`) is pure: no gin, no I/O. `train` takes plain
arguments (the CLI resolves them from gin). The state is initialised directly into
its shardings (a jit of init with `out_shardings`), so no host ever holds a full replica.

Loss: sum(w · CE) / sum(w) with the batch's float `decoder_loss_weights` w (per-mode and
tag weights, 0 on padding), tags included; optional z-loss z · sum(w · logsumexp²) / sum(w).
With gradient accumulation the sums run over all micro-batches before the division, so
the update equals the one of a single large batch. Per-mode metrics are *unweighted* mean
CE and token counts of the target tokens in each of `modes.GROUPS` (`modes.token_groups`).

The loop is a step plus hooks (`prealign_jax.hooks`: NaN guard, log, eval, checkpoint,
preemption, profiler): host sync happens only at log, eval and checkpoint steps, and a
non-finite loss stops the run before any checkpoint of the diverged state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prealign_jax import (checkpointing, console, fileio, modes, multihost, partitioning,
                          vocab, writers)
from prealign_jax import hooks as hooks_lib
from prealign_jax import model as model_lib
from prealign_jax.data import feed
from prealign_jax.errors import TrainError

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
            "decoder_positions", "decoder_loss_weights")
RUN_FILE = "run.json"  # what inference needs of a run: its model and where its data is
# Per-step sums; everything else a step returns (grad_norm, learning_rate) is averaged.
_SUM_KEYS = ("loss_sum", "weight_sum", "z_sum", "tokens") + tuple(
    f"{kind}/{g}" for g in modes.GROUPS for kind in ("ce_sum", "count"))


# ---------------------------------------------------------------- state and optimizer
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any


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

    def __post_init__(self):
        # A NaN or negative rate would train garbage for hours without a word: refuse it.
        def real(name):
            value = getattr(self, name)
            return not isinstance(value, bool) and isinstance(value, (int, float)) \
                and math.isfinite(value)

        def whole(name):
            value = getattr(self, name)
            return not isinstance(value, bool) and isinstance(value, int)

        checks = {
            "learning_rate": ("a positive number", real("learning_rate")
                              and self.learning_rate > 0),
            "warmup_steps": ("an integer >= 0", whole("warmup_steps")
                             and self.warmup_steps >= 0),
            "decay_steps": ("None or an integer >= 1", self.decay_steps is None
                            or whole("decay_steps") and self.decay_steps >= 1),
            "end_learning_rate_fraction": ("a number in [0, 1]",
                                           real("end_learning_rate_fraction")
                                           and 0 <= self.end_learning_rate_fraction <= 1),
            "b1": ("a number in [0, 1)", real("b1") and 0 <= self.b1 < 1),
            "b2": ("a number in [0, 1)", real("b2") and 0 <= self.b2 < 1),
            "eps": ("a positive number", real("eps") and self.eps > 0),
            "weight_decay": ("a number >= 0", real("weight_decay") and self.weight_decay >= 0),
            "clip_norm": ("a positive number", real("clip_norm") and self.clip_norm > 0)}
        for name, (what, ok) in checks.items():
            if not ok:
                raise TrainError(f"OptimizerConfig.{name}={getattr(self, name)!r} must be "
                                 f"{what}")


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
    groups = modes.token_groups(targets, segment_ids, token_class)
    metrics = {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights), "z_sum": z_sum,
               "tokens": jnp.sum(segment_ids != 0).astype(jnp.float32)}
    ce_by_group = jnp.sum(jnp.where(groups, ce, 0.0), axis=(1, 2))
    count_by_group = jnp.sum(groups, axis=(1, 2)).astype(jnp.float32)
    for i, g in enumerate(modes.GROUPS):
        metrics[f"ce_sum/{g}"] = ce_by_group[i]
        metrics[f"count/{g}"] = count_by_group[i]
    return objective, metrics


# ---------------------------------------------------------------- jitted steps
class Steps:
    """The jitted init / train / eval functions of one model on one mesh.

    `init(rng) -> TrainState` (created in its shardings), `from_params(params)` (a fresh
    optimizer state at step 0 for given parameters), `train(state, batch) -> (state,
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
        self.abstract_state = partitioning.sharded_shapes(boxed, mesh)
        batch_sh = partitioning.batch_sharding(mesh)
        metrics_sh = partitioning.replicated(mesh)
        self.init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                            out_shardings=self.state_shardings)
        self.from_params = jax.jit(
            lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                      opt_state=self._tx.init(params)),
            in_shardings=(self.state_shardings.params,), out_shardings=self.state_shardings,
            donate_argnums=0)
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
    for g in modes.GROUPS:
        count = total[f"count/{g}"]
        out[f"tokens/{g}"] = count
        if count:
            out[f"loss/{g}"] = total[f"ce_sum/{g}"] / count
    for k in step_metrics[0]:
        if k not in _SUM_KEYS:
            out[k] = float(np.mean([m[k] for m in step_metrics]))
    return out


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


# ---------------------------------------------------------------- the loop
def train(workdir: str, *,
          model: model_lib.ModelConfig,
          num_steps: int,
          batch_size: int,
          data: Callable[[str, int, int, int], feed.DataSources],
          mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
          optimizer: OptimizerConfig = OptimizerConfig(),
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
          distributed: dict | None = None,
          profile_steps: tuple[int, int] | None = None,
          wandb_project: str | None = None,
          hooks: Sequence[hooks_lib.Hook] = (),
          run_files: Mapping[str, str] | None = None,
          initialize_from: str | None = None) -> dict[str, float]:
    """Train (or resume from the latest checkpoint in `workdir/checkpoints`) to `num_steps`.
    A checkpoint of step 0 holds parameters alone (`prealign import`): training starts
    from them with a fresh optimizer at step 0 and the data from its start. So does a run
    without checkpoints given `initialize_from`, another run's checkpoint step directory
    (`<run>/checkpoints/<step>`, `prealign finetune`): its parameters are read, not its
    optimizer state or data position; once the run has a checkpoint of its own it resumes
    from that instead.

    Returns the metrics of the last log window; raises `errors.Preempted` after saving the
    state if the run was preempted (SIGTERM) before `num_steps`. See gin/runs/*.gin for
    every parameter.
    `data(workdir, batch_size, seq_len, seed)` gives the batches (`feed.SeqioData`: a
    registered seqio Mixture); what its `info` says is written to `<workdir>/run.json` with
    the model, for `inference.load_run`.
    `distributed`: None for one process; else one process per host, and the keyword
    arguments of `jax.distributed.initialize` ({} auto-detects Cloud TPU, SLURM, Open
    MPI, Kubernetes; elsewhere give coordinator_address, num_processes, process_id; on CPU
    also set JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo). `profile_steps` (start, stop): a
    jax.profiler trace of the steps after start up to stop, in <workdir>/tensorboard.
    `wandb_project`: also log to Weights & Biases. `hooks`: the caller's own
    `prealign_jax.hooks.Hook`s, run after the standard ones at every step. `run_files`:
    {name: text} written to `workdir` with run.json (the CLI's config.gin), once the state
    is restored or initialised, so a refused resume leaves the run's own.
    """
    _use_cpu_devices(num_cpu_devices)
    if distributed is not None:
        multihost.initialize(distributed)
    seq_len = seq_len or model.max_len
    if seq_len > model.max_len:
        raise TrainError(f"train.seq_len={seq_len} exceeds ModelConfig.max_len="
                         f"{model.max_len}")
    profile = (hooks_lib.Profile(os.path.join(workdir, "tensorboard"), profile_steps)
               if profile_steps is not None else None)
    device_mesh = mesh.make()
    console.say(multihost.describe(device_mesh))
    _check_batch(batch_size, accum_steps, device_mesh)
    fileio.gfile().makedirs(workdir)
    sources = data(workdir, batch_size, seq_len, seed)
    token_class = vocab.model_token_classes(sources.token_class, model.vocab_size)
    steps = Steps(model, make_optimizer(optimizer, num_steps),
                  learning_rate_schedule(optimizer, num_steps), device_mesh, token_class,
                  z_loss=z_loss, accum_steps=accum_steps)
    files = {RUN_FILE: json.dumps({"model": dataclasses.asdict(model), **sources.info},
                                  indent=1), **(run_files or {})}
    peak = job_peak_flops(peak_flops_per_device)
    flops_per_step = model_lib.flops_per_token(model, seq_len) * batch_size * seq_len
    console.say(f"model: {model_lib.num_params(model):,} parameters | mesh "
                f"{dict(device_mesh.shape)} | batch {batch_size} x {seq_len} | peak "
                f"{peak / 1e9:,.1f} GFLOP/s")
    return _loop(workdir, steps, sources, num_steps=num_steps,
                 tokens_per_step=batch_size * seq_len, flops_per_step=flops_per_step,
                 peak=peak, log_every=log_every, eval_every=eval_every,
                 eval_steps=eval_steps, checkpoint_every=checkpoint_every,
                 keep_checkpoints=keep_checkpoints, seed=seed, profile=profile,
                 wandb_project=wandb_project, hooks=hooks, run_files=files,
                 initialize_from=initialize_from)


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


def _check_same_model(workdir: str, model: model_lib.ModelConfig, checkpoint) -> None:
    """A resume with another shape of model is refused, naming the binding (run.json holds
    the model the checkpoints were saved with; the checkpoint's array shapes are checked
    too, for runs without it)."""
    gfile, path = fileio.gfile(), os.path.join(workdir, RUN_FILE)
    if not gfile.exists(path):  # a run from before run.json: the shapes are checked
        return
    try:
        with gfile.GFile(path) as f:
            saved = model_lib.ModelConfig(**json.loads(f.read())["model"])
    except (ValueError, KeyError, TypeError):  # no usable record
        return
    changed = model_lib.weight_changes(saved, model)
    if changed:
        raise TrainError(f"{checkpoint}: {', '.join(changed)}; resume with the run's own "
                         "model or use a new --workdir")


def _loop(workdir: str, steps: Steps, sources: feed.DataSources, *, num_steps: int,
          tokens_per_step: int, flops_per_step: float, peak: float, log_every: int,
          eval_every: int, eval_steps: int, checkpoint_every: int, keep_checkpoints: int,
          seed: int, profile: hooks_lib.Profile | None, wandb_project: str | None,
          hooks: Sequence[hooks_lib.Hook], run_files: Mapping[str, str],
          initialize_from: str | None) -> dict[str, float]:
    """Restore or init, write `run_files`, then for each step: run it, then the hooks."""
    batch_sh = partitioning.batch_sharding(steps.mesh)
    iterator = feed.ShardedIterator(sources.train)
    with contextlib.ExitStack() as closing, partitioning.activate(steps.mesh):
        if jax.process_index() == 0:  # one job per run (its peers are this job's processes)
            closing.enter_context(fileio.exclusive(workdir, "prealign training"))
        ckpt = checkpointing.Checkpoints(workdir, checkpoint_every, keep_checkpoints)
        closing.callback(ckpt.close)  # waits for pending saves
        latest = ckpt.latest_step()
        start = latest or 0
        complete = bool(start) and start >= num_steps
        if start:
            _check_same_model(workdir, steps.model.cfg, ckpt.directory / str(start))
        if complete:  # neither the state nor the data position is needed (a data pipeline
            state = None  # changed since the save could not restore its position anyway)
        elif start:
            state = ckpt.restore(start, steps.abstract_state, iterator)
            console.say(f"resumed from {ckpt.directory}/{start}")
        elif latest == 0:  # parameters alone (prealign import): T5X's initialize_from
            _check_same_model(workdir, steps.model.cfg, ckpt.directory / "0")
            state = steps.from_params(ckpt.restore_params(0, steps.abstract_state.params))
            console.say(f"starting from the parameters in {ckpt.directory}/0 (a fresh "
                        "optimizer, the data from its start)")
        elif initialize_from:  # another run's parameters (prealign finetune)
            state = steps.from_params(checkpointing.read_params(
                initialize_from, steps.abstract_state.params))
            console.say(f"starting from the parameters in {initialize_from} (a fresh "
                        "optimizer, the data from its start)")
        else:
            state = steps.init(jax.random.key(seed))
        if jax.process_index() == 0:  # only now: a refused resume keeps the run's own
            for name, text in run_files.items():
                fileio.atomic_write(os.path.join(workdir, name), text)
        if complete:
            console.say(f"{ckpt.directory}/{start} is at or past train.num_steps={num_steps}; "
                        "nothing to train")
            return {}
        writer = writers.make_writer(workdir, start, wandb_project)
        closing.callback(writer.close)
        standard = [hooks_lib.NanGuard(ckpt),
                    hooks_lib.Log(writer, log_every, summarize, tokens_per_step=tokens_per_step,
                                  flops_per_token=flops_per_step / tokens_per_step,
                                  peak_flops=peak)]
        if sources.eval is not None and eval_every:
            standard.append(hooks_lib.Eval(writer, eval_every, functools.partial(
                _evaluate, steps, sources.eval, eval_steps, batch_sh)))
        preemption = hooks_lib.Preemption(ckpt)
        standard += [hooks_lib.Checkpoint(ckpt, iterator), preemption]
        all_hooks = standard + ([profile] if profile else []) + list(hooks)
        for hook in all_hooks:
            closing.callback(hook.close)
        run = hooks_lib.Run(num_steps=num_steps, start_step=start, state=state)
        for step in range(start + 1, num_steps + 1):
            state, metrics = steps.train(run.state, feed.global_batch(next(iterator), batch_sh))
            run.record(step, state, metrics)
            if hooks_lib.after_step(all_hooks, run):
                break
    # raised once the save is complete and everything is closed; a preemption at the last
    # step leaves a finished run
    if preemption.preempted and run.step < num_steps:
        raise preemption.error(run.step)
    return run.summary


def _evaluate(steps: Steps, datasets, num_batches: int, batch_sh,
              state: TrainState) -> dict[str, float]:
    """Metrics of `num_batches` batches from the start of the eval data, folded."""
    iterator = feed.ShardedIterator(datasets)
    return summarize(jax.device_get([
        steps.evaluate(state.params, feed.global_batch(next(iterator), batch_sh))
        for _ in range(num_batches)]))
