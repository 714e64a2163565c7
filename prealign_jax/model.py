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
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prealign_jax import attention
from prealign_jax.errors import UserError

REMAT_POLICIES = ("none", "full", "dots")

# Logical axis names of the activations; parameters use the same vocabulary (see
# partitioning.LOGICAL_RULES: a rule only applies if its mesh axis is still free, so
# 'embed' is FSDP-sharded in weights but replicated in activations whose batch took fsdp).
ACT_EMBED = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "kv")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "kv")
ACT_MLP = ("batch", "length", "mlp")
ACT_VOCAB = ("batch", "length", "vocab")
# The KV cache in the layouts the decode attention's two dots read without a copy: keys
# [B, KV, hd, S] (contracted over hd), values [B, KV, S, hd] (contracted over S).
CACHE_KEY_AXES = ("batch", "kv_heads", "kv", "length")
CACHE_VALUE_AXES = ("batch", "kv_heads", "length", "kv")
CACHE_SEGMENT_AXES = ("batch", "length")


class ConfigError(UserError):
    """An inconsistent ModelConfig (bound through gin or built by hand)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder.

    `dtype` is the compute dtype (activations, matmul inputs), `param_dtype` the storage
    dtype of the weights. `remat`: "none" keeps every activation for the backward pass,
    "full" recomputes each layer, "dots" saves only the weight matmuls' outputs
    (jax.checkpoint_policies.dots_with_no_batch_dims_saveable, MaxText's "minimal").
    `attention`: the training kernel, one of `attention.IMPLS` ("blocked", "einsum",
    "xla", "cudnn", "splash"; see the attention module); "auto" is resolved per backend
    by `attention.resolve` ("blocked" on CPU, "cudnn" on GPU in bf16/fp16, "splash" on
    TPU). Decoding with a cache uses `attention.cached_attention` whatever the setting,
    reading the cache in chunks of `decode_chunk` slots up to the live length.
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
    decode_chunk: int = 2048

    def __post_init__(self):
        # num_layers may be 0 (embedding and unembedding only: plan.py's baseline).
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "max_len"):
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, int)
                    or value < (0 if name == "num_layers" else 1)):
                kind = "non-negative" if name == "num_layers" else "positive"
                raise ConfigError(f"ModelConfig.{name}={value!r} must be a {kind} integer")
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
        if (isinstance(self.decode_chunk, bool) or not isinstance(self.decode_chunk, int)
                or self.decode_chunk < 1):
            raise ConfigError(f"ModelConfig.decode_chunk={self.decode_chunk!r}: must be an "
                              "integer >= 1 (cache slots per block of decode attention)")
        attention.check(self.attention)
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


def dense(x: jax.Array, kernel: jax.Array, in_dims: int = 1) -> jax.Array:
    """x[..., *in] · kernel[*in, *out] as one 2-D matmul in x's dtype.

    Flattening batch and length first matters on CPU: XLA:CPU runs the weight gradient of
    a [B, T, d] einsum (a contraction over two axes) about 1.5x slower than [B*T, d]."""
    lead, ins = x.shape[:x.ndim - in_dims], kernel.shape[:in_dims]
    outs = kernel.shape[in_dims:]
    y = x.reshape(-1, math.prod(ins)) @ kernel.astype(x.dtype).reshape(math.prod(ins), -1)
    return y.reshape(*lead, *outs)


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


def rope_tables(positions: jax.Array, head_dim: int, theta: float, max_len: int):
    """(sin, cos) of the rotary angles at `positions` (< max_len), float32 [B, T, 1,
    head_dim/2], looked up in a constant table: computed from positions, XLA fuses the
    sin/cos into every layer's rotation and evaluates them once per head there, which on
    CPU costs more than the rotation itself. Out-of-range positions give NaN."""
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq
    lookup = functools.partial(jnp.take, indices=positions[:, :, None], axis=0, mode="fill",
                               fill_value=np.nan)
    return (lookup(jnp.asarray(np.sin(angles), jnp.float32)),
            lookup(jnp.asarray(np.cos(angles), jnp.float32)))


def rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotary embedding (rotate-half form) of x[B, T, heads, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    """Causal, packing-aware grouped-query self-attention with an optional KV cache."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, rotary):
        cfg = self.cfg
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head
        wq = _param(self, "query", _dense_init(0, (1, 2)), (d, h, hd),
                    ("embed", "heads", "kv"), cfg)
        wk = _param(self, "key", _dense_init(0, (1, 2)), (d, kv, hd),
                    ("embed", "kv_heads", "kv"), cfg)
        wv = _param(self, "value", _dense_init(0, (1, 2)), (d, kv, hd),
                    ("embed", "kv_heads", "kv"), cfg)
        wo = _param(self, "out", _dense_init((0, 1), 2), (h, hd, d),
                    ("heads", "kv", "embed"), cfg)

        q = rope(dense(x, wq), *rotary)
        k = rope(dense(x, wk), *rotary)
        q = nn.with_logical_constraint(q, ACT_HEADS)
        k = nn.with_logical_constraint(k, ACT_KV_HEADS)
        v = nn.with_logical_constraint(dense(x, wv), ACT_KV_HEADS)

        if self.decode:
            out = self._cached_attention(q, k, v, segment_ids)
        else:
            out = attention.causal_attention(q, k, v, segment_ids, cfg.attention)
        out = nn.with_logical_constraint(out, ACT_HEADS)
        return dense(out, wo, in_dims=2)

    def _cached_attention(self, q, k, v, segment_ids):
        """Append the T new keys/values (and segment ids) to the cache at the shared slot
        `cache_index` — one in-place dynamic_update_slice for the whole batch, whatever
        each row's position — then attend over the slots written so far."""
        b, t, kv, hd = k.shape
        # Created only by init (init_cache): the cache length is the init input's length.
        s_len = segment_ids.shape[1]
        zeros = lambda axes: nn.with_logical_partitioning(jnp.zeros, axes)
        cached_k = self.variable("cache", "cached_key", zeros(CACHE_KEY_AXES),
                                 (b, kv, hd, s_len), k.dtype)
        cached_v = self.variable("cache", "cached_value", zeros(CACHE_VALUE_AXES),
                                 (b, kv, s_len, hd), v.dtype)
        cached_seg = self.variable("cache", "cached_segment", zeros(CACHE_SEGMENT_AXES),
                                   (b, s_len), jnp.int32)
        index = self.variable("cache", "cache_index", zeros(()), (), jnp.int32)
        i = index.value
        dtype = cached_k.value.dtype
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k.transpose(0, 2, 3, 1).astype(dtype), (0, 0, 0, i))
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v.transpose(0, 2, 1, 3).astype(dtype), (0, 0, i, 0))
        cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids, (0, i))
        index.value = i + t
        return attention.cached_attention(q, cached_k.value, cached_v.value,
                                          cached_seg.value, segment_ids, i,
                                          self.cfg.decode_chunk)


class Mlp(nn.Module):
    """SwiGLU feed-forward: (silu(x·W_gate) * x·W_up)·W_down."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        w_in = _param(self, "wi", _dense_init(0, 2), (cfg.d_model, 2, cfg.mlp_dim),
                      ("embed", None, "mlp"), cfg)
        w_out = _param(self, "wo", _dense_init(0, 1), (cfg.mlp_dim, cfg.d_model),
                       ("mlp", "embed"), cfg)
        gate_up = dense(x, w_in)
        hidden = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        hidden = nn.with_logical_constraint(hidden, ACT_MLP)
        return dense(hidden, w_out)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, rotary):
        h = Attention(self.cfg, self.decode, name="attention")(
            RMSNorm(self.cfg, name="pre_attention_norm")(x), positions, segment_ids, rotary)
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
    applied with mutable=["cache"]): each call appends its T >= 1 tokens per row to the
    cache at the next free slots, the same slots for every row (one in-place update), and
    they attend to the slots written before them with their own segment id. `positions`
    only drive RoPE: a row's positions must cover 0..p without gaps over its real tokens,
    and tokens with segment_id 0 (padding) are written but never attended to by real ones,
    so a batch of prompts may be left- or right-aligned (right: a row's next token takes
    its own next *position* at the batch's next *slot*). A prefill is one or more calls
    with the prompt, then one token per call; at most the cache length in slots in all.
    Attention in decode mode costs O(slots written so far)
    (`attention.cached_attention`).
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

        rotary = rope_tables(positions, cfg.dims_per_head, cfg.rope_theta, cfg.max_len)
        layer_cls = _remat(DecoderLayer, cfg)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True}, in_axes=(nn.broadcast,) * 3,
                            length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, decode, name="layers")(x, positions, segment_ids, rotary)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer_cls(cfg, decode, name=f"layers_{i}")(x, positions, segment_ids,
                                                                   rotary)

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            # Embeddings are N(0, 1): scale so that logits start at unit variance.
            logits = dense(x, embedding.T) * jnp.asarray(cfg.d_model ** -0.5, dtype)
        else:
            kernel = _param(self, "logits", _dense_init(0, 1), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"), cfg)
            logits = dense(x, kernel)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ACT_VOCAB)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> Any:
        """See the module function `init_cache`."""
        return init_cache(self.cfg, batch, max_len)


# The fields that decide the parameters' shapes: a checkpoint loads only into a model that
# agrees on them; the others (attention, dtypes, decode_chunk) may change.
WEIGHT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "tie_embeddings", "scan_layers")


def weight_changes(saved: ModelConfig, new: ModelConfig) -> list[str]:
    """`ModelConfig.F=new (the run has saved)` for each of WEIGHT_FIELDS that differs."""
    return [f"ModelConfig.{f}={getattr(new, f)!r} (the run has {getattr(saved, f)!r})"
            for f in WEIGHT_FIELDS if getattr(new, f) != getattr(saved, f)]


def abstract_params(cfg: ModelConfig) -> Any:
    """The parameters' shapes, dtypes and logical axes (boxed), nothing allocated."""
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(Decoder(cfg).init, jax.random.key(0), dummy, dummy, dummy)["params"]


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int) -> Any:
    """Shapes of the KV cache with their logical axes (boxed ShapeDtypeStructs), for
    `partitioning.param_shardings`."""
    dummy = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    init = functools.partial(Decoder(cfg).init, decode=True)
    return jax.eval_shape(init, jax.random.key(0), dummy, dummy, dummy)["cache"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Any:
    """The zero KV cache for `batch` rows of up to `max_len` tokens: the "cache"
    collection, {layers_i: {attention: {cached_key, cached_value, cached_segment,
    cache_index}}}: keys [batch, num_kv_heads, head_dim, max_len] and values [batch,
    num_kv_heads, max_len, head_dim] in the compute dtype, segment ids [batch, max_len]
    and the next free slot (scan_layers: one "layers" entry with a leading num_layers
    axis). Pass it as `{"params": ..., "cache": cache}` to `Decoder.apply(...,
    decode=True, mutable=["cache"])`; to place it on a mesh, `jax.device_put(cache,
    partitioning.param_shardings(abstract_cache(...), mesh))`. Slots are not positions:
    a cache may hold more slots than `cfg.max_len` (the serving engine's rows share one
    write index), while every row's positions stay below it (RoPE's table)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        nn.unbox(abstract_cache(cfg, batch, max_len)))
