"""`prealign plan`: figures equal a hand computation for a small config, the 8B model fits
v5p HBM on 256 chips with the default (FSDP) sharding, and every shipped model x mesh pair
gets an answer (a plan, or a one-line error naming the dimension the mesh cannot split)."""

import dataclasses
import glob
import math
import os

import pytest

from prealign_jax import main, partitioning, plan
from prealign_jax import model as model_lib

GIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
CFG = model_lib.ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, mlp_dim=128, max_len=32)
FSDP8 = partitioning.MeshConfig(data=1, fsdp=8, tensor=1)
CHIP = plan.Accelerator(name="test chip", num_devices=8, hbm_bytes=1e9, peak_flops=1e12)
B, T = 16, 32  # 2 sequences per device


def make(cfg=CFG, **kwargs):
    return plan.make_plan(cfg, FSDP8, CHIP, batch_size=B, seq_len=T, **kwargs)


def test_state_gradients_flops_and_step_time_equal_a_hand_computation():
    p = make()
    d, h, kv, hd, mlp, v, layers = 64, 4, 2, 16, 128, 256, 2
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * mlp + 2 * d
    n = layers * per_layer + 2 * v * d + d
    assert n == model_lib.num_params(CFG)
    # every weight has an 'embed' axis, split 8 ways by fsdp; float32
    assert p.parameters == n * 4 // 8
    # AdamW: two moments like the parameters, plus two int32 step counts (replicated)
    assert p.optimizer_state == 2 * n * 4 // 8 + 2 * 4
    assert p.gradients == p.parameters
    assert make(accum_steps=2).gradients == 2 * n * 4 // 8  # f32 accumulator + micro grads
    # gathered: the largest block (the 256 x 64 embedding) + its gradient, float32
    assert p.gathered_weights == 2 * max(per_layer, v * d) * 4
    matmul = layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * mlp) + v * d
    flops = (6 * matmul + 12 * layers * h * hd * T) * B * T
    assert p.flops_per_step == flops
    assert p.step_seconds(0.5) == pytest.approx(flops / (8 * 1e12 * 0.5))
    assert p.rows_per_device == 2 and p.fits


@pytest.mark.parametrize("remat, per_token", [
    # full: only each layer's input survives the forward pass
    ("full", 64),
    # dots: the weight matmuls' outputs the backward pass reads (q, k, v, the attention
    # output projection, the SwiGLU input projection) and the residual stream between
    # the attention and MLP blocks
    ("dots", 4 * 16 + 2 * 2 * 16 + 64 + 2 * 128 + 64),
])
def test_activations_per_layer_equal_a_hand_computation(remat, per_token):
    one, two = (make(dataclasses.replace(CFG, num_layers=n, remat=remat)) for n in (1, 2))
    assert two.activations - one.activations == 2 * T * per_token * 4  # 2 rows, float32
    # with remat, one layer is rematerialised at a time in the backward pass
    assert two.working_set == max(plan.saved_bytes(
        dataclasses.replace(CFG, num_layers=1, remat="none", attention="blocked"), 2, T)
        - plan.saved_bytes(dataclasses.replace(CFG, num_layers=0, remat="none",
                                               attention="blocked"), 2, T),
        2 * 2 * T * 256 * 4)


def test_tensor_parallelism_splits_heads_mlp_and_vocabulary():
    mesh = partitioning.MeshConfig(data=2, fsdp=2, tensor=2)
    split = plan.make_plan(CFG, mesh, CHIP, batch_size=B, seq_len=T)
    local = plan.local_config(CFG, 2, "cpu")
    assert (local.num_heads, local.num_kv_heads, local.mlp_dim, local.vocab_size) == (
        2, 1, 64, 128)
    assert split.activations == plan.saved_bytes(local, B // 4, T)
    with pytest.raises(plan.PlanError, match=r"ModelConfig.num_kv_heads=2 is not divisible "
                                             r"by MeshConfig.tensor=4"):
        plan.local_config(CFG, 4, "cpu")


def test_a_mesh_that_cannot_split_a_weight_names_it():
    chip = dataclasses.replace(CHIP, num_devices=128)
    mesh = partitioning.MeshConfig(data=1, fsdp=-1, tensor=1)
    with pytest.raises(plan.PlanError, match=r"cannot shard \['embedding'\] \(256, 64\): "
                                             r"fsdp=128 does not divide 64"):
        plan.make_plan(CFG, mesh, chip, batch_size=128, seq_len=T)


def test_8b_fits_v5p_hbm_on_256_chips(capsys):
    argv = ["plan", "--gin_file=models/8b.gin", "--gin_file=meshes/tpu_v5p-512.gin"]
    for batch in ([], ["--batch_size=512"]):  # one and two 8k sequences per chip
        assert main.main(argv + batch) == 0
        out = capsys.readouterr().out
        assert "TPU v5p x 256 | mesh data=1 fsdp=256 tensor=1" in out
        assert ": fits" in out, out


UNSHARDABLE = {(m, mesh) for m in ("tiny", "small")  # d_model 128 / 384 over 256 chips
               for mesh in ("tpu_v5litepod-256", "tpu_v5p-512", "tpu_v6e-256")}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(os.path.basename(f)[:-4]
                                         for f in glob.glob(f"{GIN}/models/*.gin")))
def test_every_shipped_model_and_mesh_gets_an_answer(model, capsys):
    for mesh_file in sorted(glob.glob(f"{GIN}/meshes/*.gin")):
        mesh = os.path.basename(mesh_file)[:-4]
        code = main.main(["plan", f"--gin_file=models/{model}.gin",
                          f"--gin_file=meshes/{mesh}.gin"])
        out, err = capsys.readouterr()
        if (model, mesh) in UNSHARDABLE:
            assert code == 2 and "cannot shard" in err and err.count("\n") == 1, err
        else:
            assert code == 0, err
            assert "total" in out and "FLOPs per step" in out
            gib = float(out.split("total")[1].split()[0])
            assert math.isfinite(gib) and gib > 0
