"""The decoder: shapes and counts, packing isolation, causality, KV-cache decoding equal to
recomputation, and equivalence of the layer/remat/attention variants."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prealign_jax import model as M
from prealign_jax.errors import UserError

CFG = M.ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=None, mlp_dim=48, max_len=32)


@functools.cache
def _jitted(cfg):
    """(init, forward) of one config, jitted once per test session."""
    decoder = M.Decoder(cfg)
    return jax.jit(decoder.init), jax.jit(decoder.apply)


def _init(cfg, seed=0):
    """The model's own (jitted) initialisation; slow to compile, so used sparingly."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return _jitted(cfg)[0](jax.random.key(seed), tokens, tokens, tokens)


def _abstract(cfg):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(M.Decoder(cfg).init, jax.random.key(0), tokens, tokens, tokens)


def _params(cfg, seed=0):
    """Random parameters of the right shapes, without compiling an init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * (0.3 if s.ndim > 1 else 0.1)
                              + (s.ndim == 1), s.dtype),
        nn.unbox(_abstract(cfg))["params"])


def _run(cfg, variables, tokens, positions=None, segment_ids=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    return _jitted(cfg)[1](variables, tokens, positions, segment_ids)


def _tokens(shape, seed=1, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 3, vocab, jnp.int32)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"scan_layers": True},
                                {"num_kv_heads": 4, "head_dim": 16}])
def test_num_params_counts_every_parameter(kw):
    cfg = dataclasses.replace(CFG, **kw)
    params = nn.unbox(_abstract(cfg))["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == M.num_params(cfg)


def test_flops_per_token_matches_hand_count():
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    d, f, v, layers, t = 32, 48, 97, 2, 16
    matmul = layers * (d * d + 2 * d * d // 2 + d * d + 3 * d * f) + v * d  # q, k+v (GQA), o
    assert M.flops_per_token(cfg, t) == 6 * matmul + 12 * layers * d * t


def test_every_parameter_has_logical_axes_of_its_rank():
    for cfg in (CFG, dataclasses.replace(CFG, scan_layers=True)):
        boxed = _abstract(cfg)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        assert all(len(x.names) == x.value.ndim for x in leaves)
        if cfg.scan_layers:
            names = {x.names for x in leaves}
            assert ("layers", "embed", "heads", "kv") in names


def test_init_and_bf16_compute():
    """Initialised f32 weights give unit-scale logits; bf16 compute stays close to f32."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    variables = nn.unbox(_init(cfg))
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits = _run(cfg, variables, _tokens((2, 8)))
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    ref = _run(CFG, variables, _tokens((2, 8)))
    assert 0.3 < float(ref.std()) < 3.0
    assert np.allclose(logits, ref, atol=0.15), np.abs(logits - ref).max()


def test_packed_segments_are_independent():
    variables = {"params": _params(CFG)}
    a, b = _tokens((1, 5), seed=2), _tokens((1, 3), seed=3)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    out = _run(CFG, variables, packed, positions, segments)

    def alone(x):  # the document by itself at the start of a padded row
        row = jnp.zeros((1, 10), jnp.int32).at[:, :x.shape[1]].set(x)
        pos = jnp.arange(10)[None]
        return _run(CFG, variables, row, pos, (pos < x.shape[1]).astype(jnp.int32))

    np.testing.assert_allclose(out[:, :5], alone(a)[:, :5], atol=1e-5)
    np.testing.assert_allclose(out[:, 5:8], alone(b)[:, :3], atol=1e-5)


def test_future_tokens_do_not_change_past_logits():
    variables = {"params": _params(CFG)}
    tokens = _tokens((1, 8))
    changed = tokens.at[0, 5:].set(7)
    np.testing.assert_allclose(_run(CFG, variables, tokens)[:, :5],
                               _run(CFG, variables, changed)[:, :5], atol=1e-6)
    assert not np.allclose(_run(CFG, variables, tokens)[:, 5:],
                           _run(CFG, variables, changed)[:, 5:])


def _stack_layers(params, num_layers):
    """Unrolled params -> the scan layout (leading layer axis)."""
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def test_scan_and_remat_variants_compute_the_same_function():
    params = _params(CFG)
    tokens = _tokens((2, 8))
    targets = jnp.roll(tokens, -1, axis=1)

    def loss_and_grad(cfg, p):
        def loss(p):
            return M.cross_entropy(_run(cfg, {"params": p}, tokens), targets).mean()
        return jax.jit(jax.value_and_grad(loss))(p)

    ref_loss, ref_grad = loss_and_grad(CFG, params)
    ref_grad_stacked = _stack_layers(dict(ref_grad), CFG.num_layers)
    for kw in [{"remat": "full"}, {"remat": "dots"}, {"scan_layers": True},
               {"scan_layers": True, "remat": "dots"}]:
        cfg = dataclasses.replace(CFG, **kw)
        p = _stack_layers(dict(params), CFG.num_layers) if cfg.scan_layers else params
        loss, grad = loss_and_grad(cfg, p)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        expect = ref_grad_stacked if cfg.scan_layers else ref_grad
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-5), grad, expect)


def test_attention_implementations_agree():
    variables = {"params": _params(CFG)}
    tokens = _tokens((2, 8))
    segments = jnp.array([[1] * 8, [1, 1, 1, 2, 2, 2, 0, 0]])
    positions = jnp.array([list(range(8)), [0, 1, 2, 0, 1, 2, 0, 0]])
    ref, *outs = [_run(dataclasses.replace(CFG, attention=a), variables, tokens, positions,
                       segments) for a in ("einsum", "xla", "blocked", "splash")]
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_cross_entropy_matches_optax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    np.testing.assert_allclose(
        M.cross_entropy(logits, targets),
        optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-6)


@functools.cache
def _decode_step(cfg):
    decoder = M.Decoder(cfg)
    return jax.jit(lambda params, cache, t, pos, seg: decoder.apply(
        {"params": params, "cache": cache}, t, pos, seg, decode=True, mutable=["cache"]))


def _greedy_cached(cfg, params, prompts, steps, align):
    """Prefill all prompts in one padded call, then decode one token per call."""
    b, width = len(prompts), max(len(p) for p in prompts)
    tokens = np.zeros((b, width), np.int32)
    positions = np.zeros((b, width), np.int32)
    segments = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        cols = slice(0, len(p)) if align == "right" else slice(width - len(p), width)
        tokens[i, cols], positions[i, cols], segments[i, cols] = p, np.arange(len(p)), 1
    cache = M.Decoder(cfg).init_cache(b, cfg.max_len)
    step = _decode_step(cfg)
    logits, mutated = step(params, cache, tokens, positions, segments)
    last = np.array([len(p) - 1 for p in prompts]) if align == "right" else np.full(b, -1)
    next_logits = np.asarray(logits)[np.arange(b), last]
    out, all_logits = [], []
    pos = np.array([len(p) for p in prompts])
    for _ in range(steps):
        nxt = next_logits.argmax(-1)
        out.append(nxt)
        all_logits.append(next_logits)
        logits, mutated = step(params, mutated["cache"], nxt[:, None].astype(np.int32),
                               pos[:, None].astype(np.int32), np.ones((b, 1), np.int32))
        next_logits, pos = np.asarray(logits)[:, 0], pos + 1
    return np.stack(out, 1), np.stack(all_logits, 1)


def _greedy_recompute(cfg, params, prompt, steps):
    """Reference: run the full forward pass over prompt + generated tokens every step."""
    seq, logits = list(prompt), []
    for _ in range(steps):
        tokens = np.zeros((1, cfg.max_len), np.int32)
        tokens[0, :len(seq)] = seq
        segments = (np.arange(cfg.max_len) < len(seq)).astype(np.int32)[None]
        out = _run(cfg, {"params": params}, tokens, segment_ids=segments)
        last = np.asarray(out)[0, len(seq) - 1]
        logits.append(last)
        seq.append(int(last.argmax()))
    return np.array(seq[len(prompt):]), np.stack(logits)


@pytest.mark.parametrize("kw", [{}, {"scan_layers": True, "remat": "full"},
                                {"tie_embeddings": True, "num_kv_heads": 1},
                                {"decode_chunk": 3}, {"decode_chunk": 4, "scan_layers": True}])
def test_cached_greedy_decode_equals_recomputation(kw):
    cfg = dataclasses.replace(CFG, max_len=16, **kw)
    params = _params(cfg, seed=3)
    prompts = [[5, 9, 13], [7, 8, 20, 31, 4], [11]]
    refs = [_greedy_recompute(cfg, params, p, steps=6) for p in prompts]
    for align in ("right", "left"):
        tokens, logits = _greedy_cached(cfg, params, prompts, steps=6, align=align)
        for i, (ref_tokens, ref_logits) in enumerate(refs):
            np.testing.assert_allclose(logits[i], ref_logits, atol=1e-4, err_msg=align)
            np.testing.assert_array_equal(tokens[i], ref_tokens, err_msg=align)


def test_init_cache_shape_and_logical_axes():
    cfg = dataclasses.replace(CFG, dtype="bfloat16", scan_layers=True)
    cache = M.init_cache(cfg, batch=3, max_len=16)
    layer = cache["layers"]["attention"]
    leaf = layer["cached_key"]
    assert leaf.shape == (2, 3, 2, 8, 16) and leaf.dtype == jnp.bfloat16
    assert not leaf.any()
    assert layer["cached_segment"].shape == (2, 3, 16) and layer["cache_index"].shape == (2,)
    boxed = M.abstract_cache(cfg, 3, 16)["layers"]["attention"]["cached_value"]
    assert boxed.names == ("layers",) + M.CACHE_VALUE_AXES
    # slots are not positions: a cache may hold more slots than the model has positions
    wide = M.init_cache(cfg, batch=1, max_len=CFG.max_len + 8)["layers"]["attention"]
    assert wide["cached_segment"].shape == (2, 1, CFG.max_len + 8)


@pytest.mark.parametrize("kw, match", [
    ({"num_kv_heads": 3}, "num_kv_heads"), ({"remat": "some"}, "remat"),
    ({"attention": "flash"}, "attention"), ({"dtype": "float13"}, "dtype"),
    ({"d_model": 30}, "head_dim"), ({"decode_chunk": 0}, "decode_chunk"),
    ({"decode_chunk": 2.5}, "decode_chunk"), ({"decode_chunk": "x"}, "decode_chunk")])
def test_bad_config_is_a_user_error(kw, match):
    with pytest.raises(UserError, match=match):
        dataclasses.replace(CFG, **kw)
