"""The GPU experiment (gin/experiments/prealign_vs_mle_gpu.gin), checked on CPU without a
GPU: its gin resolves exactly as `prealign experiment` resolves it, into a 125M bf16 run
of at least 250M tokens per arm on one GPU that the planner says fits an H100, evaluated
as the CPU experiment is; its train step and its decode loop compile (XLA:CPU, abstract
shapes, nothing runs).

The compiles use a reduced batch with the same per-example shapes (context 1024, the
accumulation loop of `train.accum_steps`, the eval batch's prompt and cache layout):
XLA:CPU lays out temporaries for the whole batch (47 GiB at 128 x 1024), and compile time
hardly depends on the batch."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import pytest

from prealign_jax import (evaluation, experiment, main, partitioning, plan, sampling, tasks,
                          train)
from prealign_jax import model as model_lib
from prealign_jax import vocab as vocab_lib
from prealign_jax.data import prepare

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


def test_train_step_compiles_at_the_per_example_shapes(gpu_plan):
    small = dataclasses.replace(gpu_plan, batch_size=gpu_plan.accum_steps)  # 1 row each
    stats = plan.compile_check(small)
    assert stats["arguments"] > 3 * model_lib.num_params(small.model) * 4  # params + AdamW


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
