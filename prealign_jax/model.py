"""The decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU.

One module a reader can take in at one sitting (nanoGPT's bar) that still carries what a
pod needs (MaxText's habits): every parameter and the main activations carry logical axis
names (`partitioning.LOGICAL_RULES` maps them to the mesh), compute dtype is separate from
parameter dtype, layers can be rematerialised and scanned, and decoding uses a T5X-style
KV cache in the mutable "cache" collection.

Inputs are packed decoder batches: `segment_ids` (0 = padding) keep attention inside each
packed document, `positions` restart at 0 in every segment and drive RoPE.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prealign_jax.errors import UserError

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")

# Logical axis names of the activations; parameters use the same vocabulary (see
# partitioning.LOGICAL_RULES: a rule only applies if its mesh axis is still free, so
# 'embed' is FSDP-sharded in weights but replicated in activations whose batch took fsdp).
ACT_EMBED = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "kv")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "kv")
ACT_MLP = ("batch", "length", "mlp")
ACT_VOCAB = ("batch", "length", "vocab")
CACHE_AXES = ("batch", "length", "kv_heads", "kv")


class ConfigError(UserError):
    """An inconsistent ModelConfig (bound through gin or built by hand)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder.

    `dtype` is the compute dtype (activations, matmul inputs), `param_dtype` the storage
    dtype of the weights. `remat`: "none" keeps every activation for the backward pass,
    "full" recomputes each layer, "dots" saves only the weight matmuls' outputs
    (jax.checkpoint_policies.dots_with_no_batch_dims_saveable, MaxText's "minimal").
    `attention`: "einsum" (explicit scores; fastest on CPU), "xla" / "cudnn"
    (jax.nn.dot_product_attention with that implementation), "auto" picks by backend.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None
    mlp_dim: int
    max_len: int
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                              f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                              f"num_heads={self.num_heads}; set head_dim explicitly")
        if self.dims_per_head % 2:
            raise ConfigError(f"ModelConfig head_dim={self.dims_per_head} must be even (RoPE)")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"ModelConfig.remat={self.remat!r}: use one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"ModelConfig.attention={self.attention!r}: use one of "
                              f"{ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} is not a "
                                  "dtype name (e.g. 'float32', 'bfloat16')") from None

    @property
    def dims_per_head(self) -> int:
        """`head_dim`, resolved (None means d_model // num_heads)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads


def num_params(cfg: ModelConfig) -> int:
    """Number of parameters (embedding counted once when tied)."""
    d, hd = cfg.d_model, cfg.dims_per_head
    per_layer = (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd  # q, k, v
                 + cfg.num_heads * hd * d  # output projection
                 + 3 * d * cfg.mlp_dim  # SwiGLU
                 + 2 * d)  # two RMSNorm scales
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.num_layers * per_layer + embed + d


def _matmul_params(cfg: ModelConfig) -> int:
    """Parameters that enter a matmul: everything but norms and the embedding lookup."""
    d, hd = cfg.d_model, cfg.dims_per_head
    per_layer = (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
                 + 3 * d * cfg.mlp_dim)
    return cfg.num_layers * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM/MaxText convention: 6·N_matmul for the weight
    matmuls (forward + backward) plus 12·L·(heads·head_dim)·T for attention scores and
    values (not halved for causality)."""
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.dims_per_head * seq_len
    return 6.0 * _matmul_params(cfg) + attn


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token next-token loss: logsumexp(logits) - logits[target], float32 [B, T].

    Weighting (padding, per-mode weights) is the caller's: multiply and sum."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def _param(module: nn.Module, name: str, init, shape, axes, cfg: ModelConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        jnp.dtype(cfg.param_dtype))


def _dense_init(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 whatever the compute dtype."""

    cfg: ModelConfig
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                       self.cfg)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(jnp.dtype(self.cfg.dtype))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half form) of x[B, T, heads, hd] at positions[B, T]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B,T,1,half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _attention_impl(cfg: ModelConfig) -> str:
    if cfg.attention != "auto":
        return cfg.attention
    return "einsum" if jax.default_backend() == "cpu" else "xla"


def attend(q, k, v, mask, impl: str):
    """Grouped-query attention. q[B,T,H,hd], k/v[B,S,KV,hd], mask[B,T,S] bool -> [B,T,H,hd].

    Softmax runs in float32. Every query row must allow at least one key."""
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd) * jnp.asarray(hd ** -0.5, q.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


class Attention(nn.Module):
    """Causal, packing-aware grouped-query self-attention with an optional KV cache."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.cfg
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head
        dtype = jnp.dtype(cfg.dtype)
        wq = _param(self, "query", _dense_init(0, (1, 2)), (d, h, hd),
                    ("embed", "heads", "kv"), cfg)
        wk = _param(self, "key", _dense_init(0, (1, 2)), (d, kv, hd),
                    ("embed", "kv_heads", "kv"), cfg)
        wv = _param(self, "value", _dense_init(0, (1, 2)), (d, kv, hd),
                    ("embed", "kv_heads", "kv"), cfg)
        wo = _param(self, "out", _dense_init((0, 1), 2), (h, hd, d),
                    ("heads", "kv", "embed"), cfg)

        q = jnp.einsum("btd,dhk->bthk", x, wq.astype(dtype))
        k = jnp.einsum("btd,dhk->bthk", x, wk.astype(dtype))
        v = jnp.einsum("btd,dhk->bthk", x, wv.astype(dtype))
        q = nn.with_logical_constraint(rope(q, positions, cfg.rope_theta), ACT_HEADS)
        k = nn.with_logical_constraint(rope(k, positions, cfg.rope_theta), ACT_KV_HEADS)
        v = nn.with_logical_constraint(v, ACT_KV_HEADS)

        if self.decode:
            k, v, mask = self._update_cache(k, v, positions, segment_ids)
        else:
            t = x.shape[1]
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
        out = attend(q, k, v, mask, _attention_impl(cfg))
        out = nn.with_logical_constraint(out, ACT_HEADS)
        return jnp.einsum("bthk,hkd->btd", out, wo.astype(dtype))

    def _update_cache(self, k, v, positions, segment_ids):
        """Write the new keys/values at their rows' positions; return the whole cache and
        the mask "key slot <= query position". Padding tokens (segment 0) are not written,
        so prompts may be left- or right-aligned."""
        b, _, kv, hd = k.shape
        # Created only by init (init_cache): the cache length is the init input's length.
        zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
        cached_k = self.variable("cache", "cached_key", zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", zeros, v.shape, v.dtype)
        max_len = cached_k.value.shape[1]
        slot = jnp.where(segment_ids > 0, positions, max_len)  # out of range -> dropped
        rows = jnp.arange(b)[:, None]
        cached_k.value = cached_k.value.at[rows, slot].set(k, mode="drop")
        cached_v.value = cached_v.value.at[rows, slot].set(v, mode="drop")
        mask = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]
        return cached_k.value, cached_v.value, mask


class Mlp(nn.Module):
    """SwiGLU feed-forward: (silu(x·W_gate) * x·W_up)·W_down."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        w_in = _param(self, "wi", _dense_init(0, 2), (cfg.d_model, 2, cfg.mlp_dim),
                      ("embed", None, "mlp"), cfg)
        w_out = _param(self, "wo", _dense_init(0, 1), (cfg.mlp_dim, cfg.d_model),
                       ("mlp", "embed"), cfg)
        gate_up = jnp.einsum("btd,dcf->btcf", x, w_in.astype(dtype))
        hidden = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        hidden = nn.with_logical_constraint(hidden, ACT_MLP)
        return jnp.einsum("btf,fd->btd", hidden, w_out.astype(dtype))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        h = Attention(self.cfg, self.decode, name="attention")(
            RMSNorm(self.cfg, name="pre_attention_norm")(x), positions, segment_ids)
        x = nn.with_logical_constraint(x + h, ACT_EMBED)
        h = Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="pre_mlp_norm")(x))
        x = nn.with_logical_constraint(x + h, ACT_EMBED)
        return x, None  # (carry, output): the nn.scan signature


def _remat(layer_cls, cfg: ModelConfig):
    if cfg.remat == "none":
        return layer_cls
    policy = (None if cfg.remat == "full"
              else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    # prevent_cse is only needed outside scan (scan already stops CSE across the remat).
    return nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """tokens[B,T], positions[B,T], segment_ids[B,T] -> logits[B,T,V] float32.

    Decoding (`decode=True`, variables include a "cache" collection from `init_cache`,
    applied with mutable=["cache"]): the T >= 1 new tokens of row b are written to the
    cache at `positions[b]` and attend to every cache slot <= their position. A prefill is
    one call with the whole prompt, then one token per call. Each row's positions must
    cover 0..p without gaps over the calls; tokens with segment_id 0 (padding) are skipped,
    so a batch of prompts may be left-aligned (padding first) or right-aligned (padding
    last: the next token then goes to each row's own next position, overwriting the
    ignored slots). Attention in decode mode looks at the whole cache length.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, *, decode: bool = False):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embedding = _param(self, "embedding", nn.initializers.normal(1.0),
                           (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        x = jnp.take(embedding, tokens, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, ACT_EMBED)

        layer_cls = _remat(DecoderLayer, cfg)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                            length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, decode, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer_cls(cfg, decode, name=f"layers_{i}")(x, positions, segment_ids)

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            # Embeddings are N(0, 1): scale so that logits start at unit variance.
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dtype)) * cfg.d_model ** -0.5
        else:
            kernel = _param(self, "logits", _dense_init(0, 1), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"), cfg)
            logits = jnp.einsum("btd,dv->btv", x, kernel.astype(dtype))
        return nn.with_logical_constraint(logits.astype(jnp.float32), ACT_VOCAB)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> Any:
        """See the module function `init_cache`."""
        return init_cache(self.cfg, batch, max_len)


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int) -> Any:
    """Shapes of the KV cache with their logical axes (boxed ShapeDtypeStructs), for
    `partitioning.param_shardings`."""
    dummy = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    init = functools.partial(Decoder(cfg).init, decode=True)
    return jax.eval_shape(init, jax.random.key(0), dummy, dummy, dummy)["cache"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Any:
    """The zero KV cache for `batch` rows of up to `max_len` tokens: the "cache"
    collection, {layers_i: {attention: {cached_key, cached_value}}} with leaves
    [batch, max_len, num_kv_heads, head_dim] in the compute dtype (scan_layers: one
    "layers" entry with a leading num_layers axis). Pass it as `{"params": ..., "cache":
    cache}` to `Decoder.apply(..., decode=True, mutable=["cache"])`; to place it on a mesh,
    `jax.device_put(cache, partitioning.param_shardings(abstract_cache(...), mesh))`."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        nn.unbox(abstract_cache(cfg, batch, max_len)))
