"""Attention kernels, and `resolve`: the one place `ModelConfig.attention` is decided.

Training and scoring use `causal_attention` (packed causal self-attention) with one of:
"einsum" (explicit [T, T] scores: the reference), "xla" / "cudnn"
(`jax.nn.dot_product_attention` with that implementation), "blocked" (flash attention in
plain jnp with a custom VJP: the fastest on CPU) or "splash" (the Pallas TPU splash
attention JAX ships). Decoding over the KV cache uses `cached_attention` whatever the
setting. Shapes: q[B,T,H,hd], k/v[B,T,KV,hd]; query head h reads kv head h // (H / KV).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from prealign_jax.errors import UserError

IMPLS = ("auto", "blocked", "einsum", "xla", "cudnn", "splash")
PLATFORMS = {"cudnn": ("gpu",), "splash": ("tpu", "cpu")}  # cpu: interpreted, for tests
SPLASH_BLOCK = 128  # splash tiles T in multiples of the TPU lane width


class AttentionError(UserError):
    """An attention implementation that does not exist or not on this platform."""


def check(impl: str) -> None:
    """Raise a one-line error unless `impl` names an implementation."""
    if impl not in IMPLS:
        raise AttentionError(f"ModelConfig.attention={impl!r}: use one of {IMPLS}")


def resolve(impl: str, platform: str, dtype) -> str:
    """The kernel `impl` runs as on `platform` ('cpu' | 'gpu' | 'tpu': the default backend
    when tracing, the target's when planning) in compute `dtype`. 'auto': "blocked" on
    CPU; "cudnn" on GPUs in 16-bit compute (on an H200 1.5-1.7x the training throughput
    of "xla" at 125m-1b); "splash" on TPU; "xla" otherwise (set "xla" on ROCm)."""
    check(impl)
    if platform not in PLATFORMS.get(impl, (platform,)):
        raise AttentionError(f"ModelConfig.attention={impl!r} does not run on {platform}: "
                             f"use 'auto' or another of {IMPLS}")
    if impl != "auto":
        return impl
    if platform == "cpu":
        return "blocked"
    if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "splash" if platform == "tpu" else "xla"


def causal_attention(q, k, v, segment_ids, impl: str):
    """Packed causal self-attention: q[B,T,H,hd], k/v[B,T,KV,hd] -> [B,T,H,hd]; token t
    sees tokens s <= t of its own segment (padding, segment 0, sees only padding).
    `impl`: a `ModelConfig.attention` value ('auto' resolved for the default backend)."""
    impl = resolve(impl, jax.default_backend(), q.dtype)
    if impl in ("blocked", "splash"):  # heads-first kernels on a pre-scaled q
        heads_first = lambda x: x.transpose(0, 2, 1, 3)
        scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        q, k, v = heads_first(q) * scale, heads_first(k), heads_first(v)
        if impl == "blocked":
            return heads_first(blocked_attention(q, k, v, segment_ids, _block_size(q.shape[2])))
        return heads_first(splash_attention(q, k, v, segment_ids))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    if impl in ("xla", "cudnn"):  # is_causal lets cuDNN skip the blocks above the diagonal
        return jax.nn.dot_product_attention(q, k, v, mask=same_segment[:, None],
                                            is_causal=True, implementation=impl)
    t = q.shape[1]
    return _einsum_attention(q, k, v, same_segment & jnp.tril(jnp.ones((t, t), bool)))


def _einsum_attention(q, k, v, mask):
    """Grouped-query attention under an explicit mask[B,T,S] with [T, S] float32 scores;
    every query row must allow at least one key."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd) * jnp.asarray(hd ** -0.5, q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def splash_attention(q, k, v, segment_ids):
    """Causal packed attention with the Pallas splash kernel: heads first, q[B,H,T,hd]
    (pre-scaled), k/v[B,KV,T,hd]; GQA without repeating kv heads. T is padded to a
    multiple of SPLASH_BLOCK (causality keeps the padding out of sight). Off TPU the
    kernel is interpreted (tests). Under a mesh it runs per shard (shard_map: rows over
    the batch axes, heads over 'tensor', as the activations' logical axes say): the
    compiler cannot partition a Pallas call itself."""
    t = q.shape[2]
    pad = -t % SPLASH_BLOCK
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    interpret = jax.default_backend() != "tpu"

    def per_shard(q, k, v, segment_ids):
        heads, length = q.shape[1], q.shape[2]
        block = next(c for c in (512, 256, SPLASH_BLOCK) if length % c == 0)
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([splash.CausalMask((length, length))] * heads),
            block_sizes=splash.BlockSizes(*(block,) * 8),  # every tile, fwd and bwd
            head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(segment_ids, segment_ids))

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec = lambda *names: nn.logical_to_mesh_axes(names)
        per_shard = jax.shard_map(
            per_shard, mesh=mesh, check_vma=False,
            in_specs=(spec("batch", "heads", "length", "kv"),
                      *(spec("batch", "kv_heads", "length", "kv"),) * 2,
                      spec("batch", "length")),
            out_specs=spec("batch", "heads", "length", "kv"))
    return per_shard(q, k, v, segment_ids)[:, :, :t]


def cached_attention(q, k_cache, v_cache, seg_cache, q_segments, index, chunk: int):
    """Attention of T new queries over a KV cache, flash-decoding style.

    q[B,T,H,hd] sits at cache slots index..index+T-1; k_cache[B,KV,hd,S],
    v_cache[B,KV,S,hd] and seg_cache[B,S] hold what was written so far. Query t sees slots
    s <= index + t whose segment id equals its own (so padding and finished rows stay
    apart); every query sees at least its own slot. A cache of more than `chunk` slots is
    read in chunks up to the live length only, with an online softmax: a step costs
    O(slots written), not O(S)."""
    b, t, h, hd = q.shape
    kv, s_len = k_cache.shape[1], k_cache.shape[3]
    q = q.reshape(b, t, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]
    q = q * jnp.asarray(hd ** -0.5, q.dtype)
    q_slot = index + jnp.arange(t)
    neg_inf = jnp.float32(-jnp.inf)

    def scores_of(k, seg, slots):
        mask = ((slots[None] <= q_slot[:, None])[None]
                & (seg[:, None, :] == q_segments[:, :, None]))
        scores = jnp.einsum("bkgtd,bkdc->bkgtc", q, k, preferred_element_type=jnp.float32)
        return jnp.where(mask[:, None, None], scores, neg_inf)  # mask [B, T, C]

    def values(p, v):
        return jnp.einsum("bkgtc,bkcd->bkgtd", p.astype(v.dtype), v,
                          preferred_element_type=jnp.float32)

    if s_len <= chunk:  # one block: no loop, no slicing
        scores = scores_of(k_cache, seg_cache, jnp.arange(s_len))
        p = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
        out = values(p, v_cache) / p.sum(axis=-1)[..., None]
    else:
        def body(c, carry):
            m, denom, acc = carry  # [B, KV, G, T] twice, [B, KV, G, T, hd]; float32
            start = jnp.minimum(c * chunk, s_len - chunk)  # the last chunk may overlap
            slots = start + jnp.arange(chunk)
            scores = scores_of(jax.lax.dynamic_slice_in_dim(k_cache, start, chunk, axis=3),
                               jax.lax.dynamic_slice_in_dim(seg_cache, start, chunk, axis=1),
                               slots)
            scores = jnp.where(slots >= c * chunk, scores, neg_inf)  # not read twice
            m_new = jnp.maximum(m, scores.max(axis=-1))
            base = jnp.where(m_new == neg_inf, 0.0, m_new)  # nothing visible yet in the row
            p = jnp.exp(scores - base[..., None])
            scale = jnp.exp(m - base)
            v = jax.lax.dynamic_slice_in_dim(v_cache, start, chunk, axis=2)
            return (m_new, denom * scale + p.sum(axis=-1),
                    acc * scale[..., None] + values(p, v))

        init = (jnp.full(q.shape[:-1], neg_inf), jnp.zeros(q.shape[:-1], jnp.float32),
                jnp.zeros(q.shape, jnp.float32))
        live_chunks = (index + t + chunk - 1) // chunk
        _, denom, acc = jax.lax.fori_loop(0, live_chunks, body, init)
        out = acc / denom[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(v_cache.dtype)

# ---------------------------------------------------------------- blocked attention
# Flash-attention's algorithm in plain jnp, for XLA:CPU, where the elementwise passes over
# [B, H, T, T] cost more than the matmuls: query block i only meets keys [0, (i+1)·c)
# (the fully masked blocks above the diagonal are skipped), the softmax is normalised on
# the [.., c, hd] output instead of the [.., c, s] probabilities, and the backward pass
# recomputes probabilities from the saved log-sum-exp, with the softmax-gradient row sums
# taken as rowsum(dout * out) instead of over [T, T]. Layout: heads first,
# q[B,H,T,hd] (pre-scaled), k/v[B,KV,T,hd]; query head h uses kv head h // (H / KV).


def _block_size(t: int) -> int:
    """Query block length: 64 (128 past 1024 tokens, to bound the unrolled graph), else the
    largest power of two that divides t, else t. 64 measured fastest here at T = 256 and
    512 (vs 32 and 128: 1.2-1.7x)."""
    for c in (128, 64, 32, 16, 8) if t > 1024 else (64, 32, 16, 8):
        if t % c == 0 and t > c:
            return c
    return t


def _block_scores(q5, k, segment_ids, i, c):
    """Masked float32 scores of query block i: [B, KV, G, c, s] with s = (i+1)·c."""
    b, kv, g, _, hd = q5.shape
    s = (i + 1) * c
    qi = q5[:, :, :, i * c:s].reshape(b, kv, g * c, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", qi, k[:, :, :s],
                        preferred_element_type=jnp.float32).reshape(b, kv, g, c, s)
    seg_q, seg_k = segment_ids[:, i * c:s], segment_ids[:, :s]
    causal = (i * c + jnp.arange(c))[:, None] >= jnp.arange(s)[None, :]
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & causal
    return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min), qi


def _group(x, kv):
    b, h, t, hd = x.shape
    return x.reshape(b, kv, h // kv, t, hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_attention(q, k, v, segment_ids, block: int):
    """Causal packed attention in query blocks of `block` (see the comment above)."""
    return _blocked_fwd(q, k, v, segment_ids, block)[0]


def _blocked_fwd(q, k, v, segment_ids, block):
    b, h, t, hd = q.shape
    kv = k.shape[1]
    q5 = _group(q, kv)
    outs, lses = [], []
    for i in range(t // block):
        scores, _ = _block_scores(q5, k, segment_ids, i, block)
        m = scores.max(axis=-1, keepdims=True)
        e = jnp.exp(scores - m)
        denom = e.sum(axis=-1, keepdims=True)
        o = jnp.einsum("bkqs,bksd->bkqd", e.astype(v.dtype).reshape(b, kv, -1, e.shape[-1]),
                       v[:, :, :e.shape[-1]], preferred_element_type=jnp.float32)
        outs.append(o.reshape(e.shape[:-1] + (hd,)) / denom)
        lses.append(m + jnp.log(denom))
    out = jnp.concatenate(outs, axis=3).reshape(b, h, t, hd).astype(q.dtype)
    return out, (q, k, v, segment_ids, out, jnp.concatenate(lses, axis=3))


def _blocked_bwd(block, res, dout):
    q, k, v, segment_ids, out, lse = res
    b, h, t, hd = q.shape
    kv = k.shape[1]
    q5, do5 = _group(q, kv), _group(dout, kv)
    delta = jnp.sum(do5.astype(jnp.float32) * _group(out, kv).astype(jnp.float32), axis=-1,
                    keepdims=True)
    dq = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    for i in range(t // block):
        s, rows = (i + 1) * block, slice(i * block, (i + 1) * block)
        scores, qi = _block_scores(q5, k, segment_ids, i, block)
        p = jnp.exp(scores - lse[:, :, :, rows])  # [B, KV, G, c, s]
        doi = do5[:, :, :, rows].reshape(b, kv, -1, hd)
        dp = f32("bkqd,bksd->bkqs", doi, v[:, :, :s]).reshape(p.shape)
        ds = (p * (dp - delta[:, :, :, rows])).astype(q.dtype).reshape(b, kv, -1, s)
        p = p.astype(v.dtype).reshape(b, kv, -1, s)
        dv = dv.at[:, :, :s].add(f32("bkqs,bkqd->bksd", p, doi))
        dk = dk.at[:, :, :s].add(f32("bkqs,bkqd->bksd", ds, qi))
        dq.append(f32("bkqs,bksd->bkqd", ds, k[:, :, :s]).reshape(b, kv, -1, block, hd))
    dq = jnp.concatenate(dq, axis=3).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
