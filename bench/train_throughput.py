"""Training-step throughput of the decoder: tokens/s and MFU per model config.

A full step (forward + backward + AdamW via optax, jitted, state donated) on synthetic
packed batches, built from prealign_jax.model only (no train.py), so the figures isolate the
model. MFU = model FLOPs/s (model.flops_per_token: 6·N_matmul + 12·L·d·T) ÷ a peak: on CPU
an f32 matmul peak measured in the same run (train.measure_matmul_peak), or --peak_tflops.
Each config runs in its own subprocess so peak_rss_mb is its own. One JSON object a line:

    .venv/bin/python bench/train_throughput.py                 # tiny and small, CPU, f32
    .venv/bin/python bench/train_throughput.py --configs=small --profile=/tmp/prof
    bash bench/gpu_train_throughput.sh                            # 125m and 1b, bf16, GPU

Batches (rows × context): tiny 16×256, small 8×512, 125m 16×1024, 1b 8×2048 (--batch).
The machine may be shared: every timed block is paired with a fresh matmul-peak reading
and the MFU is the median of the per-block ratios; step_s_all/peak_gflops_all show the
spread. --profile adds the ops that took the most time per step ("profile_top").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    # name: model shape, context, default global batch (rows)
    "tiny": (dict(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                  mlp_dim=512), 256, 16),
    "small": (dict(vocab_size=8192, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6,
                   mlp_dim=1536), 512, 8),
    "125m": (dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                  mlp_dim=3072), 1024, 16),
    "1b": (dict(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                mlp_dim=5632), 2048, 8),
}


def synthetic_batch(rng, batch: int, seq_len: int, vocab: int, docs_per_row: int = 2):
    """Packed rows of `docs_per_row` documents each (segment ids, restarting positions)."""
    import numpy as np

    tokens = rng.integers(3, vocab, (batch, seq_len + 1), dtype=np.int32)
    bounds = np.sort(rng.integers(1, seq_len, (batch, docs_per_row - 1)), axis=1)
    segments = 1 + (np.arange(seq_len)[None, :, None] >= bounds[:, None, :]).sum(-1)
    starts = np.concatenate([np.zeros((batch, 1), int), bounds], axis=1)
    positions = np.arange(seq_len)[None] - np.take_along_axis(starts, segments - 1, axis=1)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions.astype(
        np.int32), segment_ids=segments.astype(np.int32),
        weights=np.ones((batch, seq_len), np.float32))


def run_one(args) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np
    import optax

    from prealign_jax import model as M

    shape, seq_len, default_batch = CONFIGS[args.config]
    batch = args.batch or default_batch
    cfg = M.ModelConfig(**shape, head_dim=None, max_len=seq_len, dtype=args.dtype,
                        param_dtype="float32", remat=args.remat, scan_layers=args.scan,
                        attention=args.attention)
    decoder = M.Decoder(cfg)
    optimizer = optax.adamw(3e-4, weight_decay=0.1)
    data = synthetic_batch(np.random.default_rng(0), batch, seq_len, cfg.vocab_size)

    def init(key):
        params = nn.unbox(decoder.init(key, data["inputs"], data["positions"],
                                       data["segment_ids"])["params"])
        return params, optimizer.init(params)

    def loss_fn(params, b):
        logits = decoder.apply({"params": params}, b["inputs"], b["positions"],
                               b["segment_ids"])
        loss = (M.cross_entropy(logits, b["targets"]) * b["weights"]).sum()
        return loss / b["weights"].sum()

    def train_step(state, b):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, b)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    state = jax.jit(init)(jax.random.key(0))
    data = jax.device_put(data)
    step = jax.jit(train_step, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0

    # The machine is shared: measure the matmul peak next to every timed block and take
    # the median of the per-block ratios, so a change in load hits both sides alike.
    if args.peak_tflops:
        peak = lambda: args.peak_tflops * 1e3  # noqa: E731
    else:  # train.py pulls in TF/seqio: CPU runs only (the GPU script passes a peak)
        from prealign_jax.train import measure_matmul_peak
        peak = lambda: measure_matmul_peak(repeats=3) / 1e9  # noqa: E731
    flops_per_step = M.flops_per_token(cfg, seq_len) * batch * seq_len
    for _ in range(args.warmup):
        state, loss = compiled(state, data)
    float(loss)
    step_times, peaks = [], []
    for _ in range(args.repeats):
        peaks.append(peak())
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, loss = compiled(state, data)
        float(loss)  # one host sync per timed block, as a real loop logs
        step_times.append((time.perf_counter() - t0) / args.steps)
    step_s = float(np.median(step_times))
    tokens_per_s = batch * seq_len / step_s
    mfu = float(np.median([flops_per_step / t / 1e9 / p for t, p in zip(step_times, peaks)]))
    extra = {}
    if args.profile:
        holder = [state]

        def run_steps(n):
            for _ in range(n):
                holder[0], out = compiled(holder[0], data)
            float(out)

        from profiling import profile_top

        extra["profile_top"] = profile_top(run_steps, compiled.as_text(),
                                           os.path.join(args.profile, args.config))
    return dict(config=args.config, backend=jax.default_backend(), dtype=args.dtype,
                batch=batch, seq_len=seq_len, params_m=round(M.num_params(cfg) / 1e6, 2),
                remat=args.remat, scan_layers=args.scan, attention=args.attention,
                tokens_per_s=round(tokens_per_s, 1), step_s=round(step_s, 4),
                step_s_all=[round(t, 4) for t in step_times],
                peak_gflops_all=[round(p, 1) for p in peaks],
                model_gflops_per_s=round(flops_per_step / step_s / 1e9, 1),
                matmul_peak_gflops=round(float(np.median(peaks)), 1),
                mfu=round(mfu, 4), compile_s=round(compile_s, 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                device_peak_mb=round((jax.devices()[0].memory_stats() or {}).get(
                    "peak_bytes_in_use", 0) / 2 ** 20),
                loss=round(float(loss), 4), **extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small",
                        help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # one config, in a subprocess
    parser.add_argument("--batch", type=int, default=0, help="rows per step (0: default)")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--scan", action="store_true", help="scan over layers")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", default="",
                        help="trace 2 more steps into this folder; add the top ops")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="accelerator peak for MFU (0: measure an f32 matmul)")
    args = parser.parse_args(argv)
    if args.config:
        print(json.dumps(run_one(args)), flush=True)
        return
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"--configs: unknown config {name!r}; choose from {sorted(CONFIGS)}")
        child = [a for a in (argv if argv is not None else sys.argv[1:])
                 if not a.startswith("--configs")]
        subprocess.run([sys.executable, os.path.abspath(__file__), f"--config={name}", *child],
                       check=True)


if __name__ == "__main__":
    main()
