"""The GPU experiment (gin/experiments/prealign_vs_mle_gpu.gin), checked on CPU without a
GPU: its gin resolves exactly as `prealign experiment` resolves it, into a 125M bf16 run
of at least 250M tokens per arm on one GPU that the planner says fits an H100, evaluated
as the CPU experiment is; its train step and its decode loop compile (XLA:CPU, abstract
shapes, nothing runs); `launch/experiment.sh --gin_file=<it>` is the one command.

Both compile at the experiment's own shapes: the train step at the full 128 x 1024 batch
(4 micro-batches), the decode loop at the evaluation's batch; about 20 s and 8 s of CPU
here ('auto' attention compiles as 'blocked' on CPU, as 'cudnn' on the GPU)."""

import functools
import inspect
import os
import shlex
import subprocess

import jax
import jax.numpy as jnp
import pytest

from prealign_jax import (evaluation, experiment, main, partitioning, plan, sampling, tasks,
                          train)
from prealign_jax import model as model_lib
from prealign_jax import vocab as vocab_lib
from prealign_jax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_GIN = "experiments/prealign_vs_mle_gpu.gin"
REQUIRED = ("model", "num_steps", "batch_size", "data")  # as main.experiment_command


def experiment_args(gin_file):
    """The arguments `prealign experiment --gin_file=<gin_file>` hands the library."""
    from prealign_jax.configurables import bindings

    main.parse_gin([gin_file], [])
    return dict(prepare_args=bindings("prepare"), train_args=bindings("train", REQUIRED),
                register=functools.partial(tasks.register, **bindings("tasks.register")),
                evaluate_args=bindings("evaluate"), **bindings("experiment"))


@pytest.fixture(scope="module")
def parsed():
    """The GPU experiment's arguments and the hardware its mesh file names."""
    from prealign_jax.configurables import bindings

    args = experiment_args(GPU_GIN)
    return args, plan.Accelerator(**bindings("Accelerator"))


@pytest.fixture(scope="module")
def gpu(parsed):
    return parsed[0]


def test_every_binding_reaches_a_parameter_of_its_stage(gpu):
    inspect.signature(experiment.experiment).bind("W", **gpu)
    inspect.signature(prepare.prepare).bind(**gpu["prepare_args"])
    inspect.signature(train.train).bind("W", **gpu["train_args"])
    inspect.signature(evaluation.evaluate).bind(None, **gpu["evaluate_args"])
    inspect.signature(tasks.register).bind("D", **gpu["register"].keywords)


def test_a_125m_bf16_run_of_250m_tokens_per_arm_on_one_gpu(gpu):
    args = gpu["train_args"]
    cfg, mesh = args["model"], args["mesh"]
    assert 120e6 < model_lib.num_params(cfg) < 130e6
    assert (cfg.dtype, cfg.param_dtype, cfg.max_len) == ("bfloat16", "float32", 1024)
    assert gpu["prepare_args"]["vocab_size"] <= cfg.vocab_size
    assert args["num_cpu_devices"] is None and args["peak_flops_per_device"] == 989e12
    assert mesh.shape(1) == (1, 1, 1)  # (data, fsdp, tensor) on one GPU
    seq_len = args["seq_len"] or cfg.max_len
    # text tokens are ~89% of a packed 128 x 1024 batch of this corpus (the gin header)
    assert 0.89 * args["batch_size"] * seq_len * args["num_steps"] >= 250e6


def test_evaluated_as_the_cpu_experiment_is(gpu):
    cpu = experiment_args("experiments/prealign_vs_mle.gin")
    assert gpu["evaluate_args"] == cpu["evaluate_args"]
    assert gpu["seeds"] == cpu["seeds"] and gpu["budget_batches"] == cpu["budget_batches"]


@pytest.fixture(scope="module")
def gpu_plan(parsed):
    args, accelerator = parsed
    return plan.make_plan(args["train_args"]["model"], args["train_args"]["mesh"],
                          accelerator, batch_size=args["train_args"]["batch_size"],
                          seq_len=args["train_args"]["seq_len"],
                          accum_steps=args["train_args"]["accum_steps"])


def test_the_plan_fits_one_h100_with_room(gpu_plan):
    assert gpu_plan.num_devices == 1 and gpu_plan.attention == "cudnn"
    assert gpu_plan.total <= plan.TIGHT * gpu_plan.accelerator.hbm_bytes


def test_train_step_compiles_at_the_full_batch(gpu_plan):
    stats = plan.compile_check(gpu_plan)
    # its arguments: the state the plan counts (+ the int32 step) and the 128 x 1024 batch
    batch = len(train.FEATURES) * gpu_plan.batch_size * gpu_plan.seq_len * 4
    assert stats["arguments"] == gpu_plan.parameters + gpu_plan.optimizer_state + 4 + batch


def test_decode_loop_compiles_at_the_eval_batch_size(gpu, spm_vocab):
    cfg = gpu["train_args"]["model"]
    mesh = gpu["train_args"]["mesh"].make(jax.devices()[:1])
    batch = gpu["evaluate_args"]["batch_size"]
    width = 128  # prompt slots: the openings, rounded up to 16
    tables = sampling.mask_tables("assistant", vocab_lib.model_token_classes(
        vocab_lib.token_classes(spm_vocab), cfg.vocab_size))
    rows = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype)
    params = partitioning.sharded_shapes(model_lib.abstract_params(cfg), mesh)
    run = sampling._compiled_decode(cfg, sampling.SamplingConfig(), mesh, batch, width)
    with partitioning.activate(mesh):  # as Sampler.generate calls it
        compiled = run.lower(params, tuple(tables), jax.ShapeDtypeStruct((batch, width),
                                                                         jnp.int32),
                             rows(jnp.int32), rows(jnp.int32), sampling.sampling_key(0),
                             jnp.asarray(True)).compile()
    tokens = compiled.out_info.tokens
    assert tokens.shape == (batch, sampling.SamplingConfig().max_new_tokens)


def test_one_command_runs_the_gpu_experiment():
    def dry_run(*args, **env):
        done = subprocess.run([os.path.join(ROOT, "launch", "experiment.sh"), "--dry_run",
                               *args], capture_output=True, text=True, timeout=60,
                              env={**{k: v for k, v in os.environ.items()
                                      if k != "WORKDIR"}, **env})
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    setup, command = dry_run(f"--gin_file={GPU_GIN}", "--gin.experiment.seeds=[0, 1]")
    assert "jax[cuda12]" in setup  # the CUDA plugin is installed before the run
    assert shlex.split(command) == [
        "prealign", "experiment", f"--gin_file={GPU_GIN}",
        f"--workdir={ROOT}/workdir/prealign_vs_mle_gpu", "--gin.experiment.seeds=[0, 1]"]
    # the CPU experiment stays the default, with its own workdir
    assert dry_run(WORKDIR="/runs/x") == [
        "prealign experiment --gin_file=experiments/prealign_vs_mle.gin --workdir=/runs/x"]
