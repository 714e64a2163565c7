"""Decode throughput of the masked sampler, its mask overhead, and a Hugging Face peer.

Prints one JSON object per (config, batch): step_ms (one decode step of the whole batch),
tokens_per_s (new tokens, all rows), the mask overhead (time per decode step of the masked
loop ÷ the same loop compiled without any mode machinery, medians of --repeats interleaved
runs in one process), the copy overhead (the masked loop with `copy_quotes` and a 16-token
user turn ÷ the masked loop), and, at the --hf_batches, hf_tokens_per_s: `transformers` `generate`
on a LlamaForCausalLM of the same dimensions with an equivalent state-tracking mode-mask
LogitsProcessor (optional: pip install .[bench]; null when torch/transformers are missing).
Then one object per --lengths entry (config small, batch 8): the step time with a cache of
that many slots (a prompt of length - 80 tokens; (time of 80 new tokens - time of 16) / 64
steps, so the prefill cancels out).

Both sides: random weights, sampling at temperature 1, the `grammar` policy (every state
allows text, so HF's min_new_tokens never meets an all-masked row), prompt
`<ai>`, exactly --new_tokens steps (HF: min_new_tokens = max_new_tokens; ours: steps of the
while loop x batch, so rows that end early do not flatter the figure).

    python bench/sample_throughput.py [--configs tiny,small] [--batches 1,8,32]
    python bench/sample_throughput.py --configs tiny --batches 1,8 --no_hf --profile /tmp/p

--profile traces two calls of the masked loop and adds "profile_top": the ops that took the
most time per *decode step* (the call's time divided by its steps), as [seconds, share,
kind, shape, source].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from prealign_jax import hf, model as model_lib, modes, partitioning, sampling

CONFIGS = {
    "tiny": dict(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                 head_dim=None, mlp_dim=512, max_len=512),
    "small": dict(vocab_size=8192, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6,
                  head_dim=None, mlp_dim=1536, max_len=512),
}


def token_classes(vocab_size: int) -> np.ndarray:
    """The layout `vocab.train` produces: pad 0, eos 1, unk 2, then the seven tags."""
    classes = np.full((vocab_size,), modes.TEXT, np.int32)
    classes[0], classes[1] = modes.PAD_CLASS, modes.EOS_CLASS
    for i, tag in enumerate(modes.TAGS):
        classes[3 + i] = modes.TAG_CLASS[tag]
    return classes


def bench_ours(cfg, batch, new_tokens, repeats, profile=""):
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    params = model_lib.Decoder(cfg).init(
        jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
    scfg = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0,
                                   top_p=1.0)
    tables = sampling.mask_tables("grammar", token_classes(cfg.vocab_size))
    ai = modes.GRAMMAR.compile().states.index("ai")
    prompt = np.zeros((batch, 16), np.int32)
    prompt[:, 1] = 3 + modes.TAGS.index("<ai>")
    lengths = np.full((batch,), 2, np.int32)
    state = np.full((batch,), ai, np.int32)
    args = (params, tuple(jnp.asarray(t) for t in tables), prompt, lengths, state)
    classes = token_classes(cfg.vocab_size)
    source = np.random.default_rng(0).integers(16, cfg.vocab_size, (batch, 16), np.int32)
    copy = (source, classes == modes.TEXT, classes == modes.TAG_CLASS["<redacted/>"])
    runs = {True: sampling._compiled_decode(cfg, scfg, mesh, batch, 16),
            False: sampling._compiled_decode(cfg, scfg, mesh, batch, 16, masked=False),
            "copy": sampling._compiled_decode(
                cfg, dataclasses.replace(scfg, copy_quotes=True), mesh, batch, 16)}
    call = lambda run, r: run(*args, sampling.sampling_key(r), jnp.asarray(True),
                              *([copy] if run is runs["copy"] else []))  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(call(runs[True], 0))
    compile_s = time.perf_counter() - t0
    for key in (False, "copy"):
        jax.block_until_ready(call(runs[key], 0))
    per_step = {key: [] for key in runs}
    for r in range(repeats):
        for key, run in runs.items():  # interleaved: drift hits all alike
            t0 = time.perf_counter()
            out = jax.block_until_ready(call(run, r))
            steps = int(np.asarray(out.lengths).max())
            per_step[key].append((time.perf_counter() - t0) / steps)
    masked = statistics.median(per_step[True])
    extra = {}
    if profile:
        from profiling import profile_top

        compiled = runs[True].lower(*args, sampling.sampling_key(0),
                                    jnp.asarray(True)).compile()

        def run_calls(n):
            for r in range(n):
                jax.block_until_ready(compiled(*args, sampling.sampling_key(r),
                                               jnp.asarray(True)))

        top = profile_top(run_calls, compiled.as_text(),
                          os.path.join(profile, f"{cfg.d_model}_{batch}"))
        extra["profile_top"] = [[round(t / new_tokens, 7), *rest] for t, *rest in top]
    return dict(tokens_per_s=batch / masked, step_ms=masked * 1e3, compile_s=compile_s,
                mask_overhead_ratio=masked / statistics.median(per_step[False]),
                copy_overhead_ratio=statistics.median(per_step["copy"]) / masked, **extra)


def bench_hf(cfg, batch, new_tokens, repeats):
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_len,
        pad_token_id=0, eos_token_id=1, bos_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    # The mask as users run it in transformers (prealign_jax.hf), every row starting in ai
    tables = hf.ModeTables(hf.modes_spec(["grammar"], token_classes(cfg.vocab_size)),
                           "grammar")
    processor = hf.mode_logits_processor(tables, start_states=["ai"] * batch)
    prompt = torch.tensor([[0, 3 + modes.TAGS.index("<ai>")]] * batch)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                           top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens,
                           logits_processor=transformers.LogitsProcessorList([processor]))
        if r:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return batch * new_tokens / statistics.median(times)


def bench_length(cfg, batch, length, repeats):
    """Step time of the masked loop with a prompt of `length` - 80 tokens, so that 80 new
    tokens fill a cache of `length` slots (see the docstring)."""
    cfg = dataclasses.replace(cfg, max_len=length)
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    params = model_lib.Decoder(cfg).init(
        jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
    tables = tuple(jnp.asarray(t) for t in sampling.mask_tables(
        "grammar", token_classes(cfg.vocab_size)))
    width = length - 80
    prompt = np.random.default_rng(0).integers(16, cfg.vocab_size, (batch, width),
                                               dtype=np.int32)
    prompt[:, 0] = 0
    args = (params, tables, prompt, np.full((batch,), width, np.int32),
            np.zeros((batch,), np.int32))
    runs = {n: sampling._compiled_decode(
        cfg, sampling.SamplingConfig(max_new_tokens=n, temperature=1.0, top_p=1.0), mesh,
        batch, width) for n in (16, 80)}
    times = {16: [], 80: []}
    for r in range(repeats + 1):
        for n, run in runs.items():
            t0 = time.perf_counter()
            out = jax.block_until_ready(run(*args, sampling.sampling_key(r), jnp.asarray(True)))
            if r:
                times[n].append((time.perf_counter() - t0, int(np.asarray(out.lengths).max())))
    step = (statistics.median(t for t, _ in times[80]) - statistics.median(
        t for t, _ in times[16])) / (times[80][0][1] - times[16][0][1])
    return dict(step_ms=step * 1e3, tokens_per_s=batch / step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--hf_batches", default="8", help="batches the HF peer runs at")
    parser.add_argument("--lengths", default="256,2048",
                        help="cache lengths of the length sweep (small, batch 8); '' skips")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no_hf", action="store_true", help="skip the transformers peer")
    parser.add_argument("--profile", default="",
                        help="trace the masked loop into this folder; add the top ops")
    args = parser.parse_args()
    hf_batches = {int(b) for b in args.hf_batches.split(",") if b}
    if any(int(n) <= 96 for n in args.lengths.split(",") if n):
        parser.error(f"--lengths {args.lengths}: each must exceed 96 (80 new tokens after a "
                     "prompt of at least 16)")
    for name in args.configs.split(","):
        cfg = model_lib.ModelConfig(**CONFIGS[name])
        for batch in map(int, args.batches.split(",")):
            ours = bench_ours(cfg, batch, args.new_tokens, args.repeats, args.profile)
            hf = None if args.no_hf or batch not in hf_batches else bench_hf(
                cfg, batch, args.new_tokens, max(2, args.repeats // 2))
            print(json.dumps(dict(
                config=name, batch=batch, new_tokens=args.new_tokens,
                step_ms=round(ours["step_ms"], 3),
                tokens_per_s=round(ours["tokens_per_s"], 1),
                mask_overhead_ratio=round(ours["mask_overhead_ratio"], 4),
                copy_overhead_ratio=round(ours["copy_overhead_ratio"], 4),
                compile_s=round(ours["compile_s"], 2),
                hf_tokens_per_s=None if hf is None else round(hf, 1),
                speedup_vs_hf=None if hf is None else round(ours["tokens_per_s"] / hf, 2),
                backend=jax.default_backend(),
                **({"profile_top": ours["profile_top"]} if args.profile else {}))),
                flush=True)
    for length in (int(n) for n in args.lengths.split(",") if n):
        out = bench_length(model_lib.ModelConfig(**CONFIGS["small"]), 8, length,
                           args.repeats)
        print(json.dumps(dict(config="small", batch=8, length=length,
                              step_ms=round(out["step_ms"], 3),
                              tokens_per_s=round(out["tokens_per_s"], 1),
                              backend=jax.default_backend())), flush=True)


if __name__ == "__main__":
    main()
