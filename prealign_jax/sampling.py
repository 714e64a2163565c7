"""The sampler: one jitted decode loop with the static mode-transition mask.

A prompt is prefilled into the KV cache (`prefill_chunk` tokens per model call), then a
single `lax.while_loop` samples every new token: no Python runs per token. Each row carries
its policy state (initialised by running the FSM over its prompt). The tables are a static
`allowed[S+1, V]` / `next_state[S+1, V]` pair built once per (policy, vocabulary) by
`modes`; `use_mask` is a traced boolean, so switching the mask off (to measure what the
unconstrained model does) does not retrace.

The guarantee (`sampling_logits`): with the mask on, a token the policy forbids in a row's
state has probability exactly 0, whatever the logits (any finite value, +-inf, NaN) and
whatever the accepted temperature, top-k and top-p; `pad`, `unk` and ids beyond the
vocabulary are never drawn, mask on or off. Forbidden logits are true `-inf`, written both
before the filters (so top-k/top-p rank allowed tokens only) and after them (so no filter
can bring one back); allowed logits are shifted so their maximum is 0 before temperature,
so no temperature can overflow them or close the gap to a forbidden token.

Faithful quoting (`copy_quotes`): a quote is the user's words. With the option on and the
mask on, inside a quote a text token must continue a copy of the row's user turn (the
text ids of the prompt's human spans, `copy_source`), `<redacted/>` skips at least one of
its tokens, and the policy's tags (`</quote>`) stay allowed. The source positions a copy
may continue from are carried per row in the loop (`copy_step`), so the constraint costs
one scatter over the source per token, and every quote decodes to a copy (`tags.is_copy`).

Sequence layout: the model was trained on seqio-style inputs (targets shifted right, a 0
at the start of every document), so row b feeds `[0, prompt_b...]` at positions 0..len_b-1
(right-padded to the batch's prompt length) and its first new token lands at position
len_b.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prealign_jax import chat, model as model_lib, modes, partitioning, tags, vocab as vocab_lib
from prealign_jax.errors import UserError

NEVER_SAMPLED = (vocab_lib.PAD_ID, vocab_lib.UNK_ID)  # ids that are never text
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6  # beyond: 0 (greedy) is the limit, or a typo
FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p")  # set by CLI flags and gin
MAX_SEED = 2 ** 63 - 1  # a PRNG seed is a signed 64-bit integer


class SamplingError(UserError):
    """A bad prompt, mode or sampling setting (names the flag and what to do)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn: temperature 0 (greedy) or in [MIN_TEMPERATURE,
    MAX_TEMPERATURE]; top_k 0 (off) or a positive count; top_p in (0, 1] (1 is off).
    NaN and infinities are refused. The defaults are the project's decoding defaults
    (`prealign sample`, `prealign eval`): temperature 0.7, nucleus 0.9."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    top_p_candidates: int = 256  # top-p cuts the nucleus among this many likeliest tokens
    prefill_chunk: int = 512  # prompt tokens per model call in the prefill
    copy_quotes: bool = False  # quotes copy the user's turn (module docstring; mask on only)

    def __post_init__(self):
        def number(name, kind):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
                where = f" (--{name} / evaluate.{name})" if name in FLAGS else ""
                raise SamplingError(f"{name}={value!r}: must be a finite number{where}")
            return value

        if number("max_new_tokens", numbers.Integral) < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        t = number("temperature", numbers.Real)
        if t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise SamplingError(
                f"temperature={t}: must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                f"{MAX_TEMPERATURE:g}] (--temperature / evaluate.temperature)")
        if number("top_k", numbers.Integral) < 0:
            raise SamplingError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < number("top_p", numbers.Real) <= 1:
            raise SamplingError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        for name in ("top_p_candidates", "prefill_chunk"):
            if number(name, numbers.Integral) < 1:
                raise SamplingError(f"{name}={getattr(self, name)}: must be >= 1")
        if not isinstance(self.copy_quotes, bool):
            raise SamplingError(f"copy_quotes={self.copy_quotes!r}: must be True or False "
                                "(--copy_quotes / evaluate.copy_quotes)")


def mask_tables(policy: modes.Policy | str, token_class: np.ndarray) -> modes.VocabTables:
    """The policy's tables over a model's ids; pad and unk are never drawn, mask on or off."""
    return modes.get_policy(policy).compile().for_vocab(token_class, never=NEVER_SAMPLED)


class SampleOutput(NamedTuple):
    tokens: Any  # [B, N] int32; PAD_ID after a row's end
    mode_ids: Any  # [B, N] int32: the mode each token was sampled in (-1 after the end)
    log_probs: Any  # [B, N] float32, under the distribution actually sampled from
    lengths: Any  # [B] int32: new tokens per row, EOS included
    final_state: Any  # [B] int32: policy state after the last token


class CopyTables(NamedTuple):
    """What the copy constraint reads: each row's user turn and two id sets of the
    vocabulary (a pytree, so a new prompt batch does not retrace)."""

    source: Any  # [B, L] int32: the text ids of the row's human spans, PAD after them
    is_text: Any  # [V] bool: ids of text (the ones a quote must copy)
    is_redaction: Any  # [V] bool: `<redacted/>`


QUOTE_MODE = modes.MODES.index("quote")


def copy_source(ids, token_class: np.ndarray) -> np.ndarray:
    """The text ids of a prompt's human spans (the user's turn), in order: what a faithful
    quote may copy. Read by the grammar, so an escaped `<human>` typed by a user is text."""
    ids = np.asarray(ids, np.int32)
    classes = np.asarray(token_class, np.int32)[ids]
    read_in = modes.run_numpy(modes.grammar_tables(), classes[None])[0][0]
    return ids[(read_in == modes.MODES.index("human")) & (classes == modes.TEXT)]


def copy_allowed(reach, source, vocab_size: int):
    """[B, V]: the ids that continue a copy from some reachable source position."""
    hits = jnp.zeros((source.shape[0], vocab_size), jnp.int32)
    rows = jnp.arange(source.shape[0])[:, None]
    return hits.at[rows, source].add(reach.astype(jnp.int32)) > 0


def copy_constrained(allowed, in_quote, reach, copy: CopyTables):
    """`allowed` [B, V], narrowed in the rows inside a quote (`in_quote` [B]) to the ids
    that are not text and the text ids that continue a copy from `reach` [B, L]; while no
    row is in a quote, the scatter is skipped (a `lax.cond`)."""
    return jax.lax.cond(
        in_quote.any(), lambda a: a & (~in_quote[:, None] | ~copy.is_text
                                       | copy_allowed(reach, copy.source, a.shape[-1])),
        lambda a: a, allowed)


def copy_step(reach, source, token, was_quote, is_quote, redaction):
    """Source positions reachable after `token`: all of them when a quote opens; after a
    text token, the positions right after the reachable ones that held it; after
    `<redacted/>`, every position beyond a reachable one (it stands for >= 1 token)."""
    fresh = source != vocab_lib.PAD_ID
    copied = jnp.pad((reach & (source == token[:, None]))[:, :-1], ((0, 0), (1, 0)))
    skipped = jnp.pad(jnp.cumsum(reach, axis=1)[:, :-1] > 0, ((0, 0), (1, 0))) & fresh
    inside = jnp.where(redaction[:, None], skipped, copied)
    return jnp.where((is_quote & ~was_quote)[:, None], fresh,
                     jnp.where(was_quote[:, None], inside, reach))


StepFn = Callable[..., tuple[Any, Any]]
"""step_fn(params, cache, tokens[B,T], positions[B,T], segment_ids[B,T]) -> (logits, cache)"""


class RowSettings(NamedTuple):
    """Per-row sampling settings, traced (one compiled program serves every setting, as a
    server needs): temperature [B] (0 = greedy), top_k [B] (0 = off, at most
    `candidates`), top_p [B] (1 = off); `candidates` is static: top-k and top-p rank
    among this many likeliest tokens. Validated by the caller, as SamplingConfig is."""

    temperature: Any
    top_k: Any
    top_p: Any
    candidates: int = 256


def sampling_logits(logits, allowed, cfg: SamplingConfig | RowSettings):
    """The logits a row's token is drawn from: `-inf` exactly where `allowed` is False.

    NaN counts as -inf. If an allowed logit is +inf, the +inf allowed tokens share the
    probability evenly; if every allowed logit is -inf or NaN, all allowed tokens do (the
    defined result for a degenerate row). Otherwise allowed logits are shifted so their
    maximum is 0, then temperature, top-k and top-p (nucleus) apply, ranking allowed tokens
    only: top-p among the `top_k` likeliest (when set, as in Hugging Face's order), else
    among the `top_p_candidates` likeliest (a bounded top-k instead of sorting the
    vocabulary every step, as serving engines do). Every row keeps at least one allowed
    token with logit 0 before the filters. `cfg` is one setting for the batch (static:
    filters that are off cost nothing) or per-row `RowSettings` (traced).
    """
    neg_inf = jnp.float32(-jnp.inf)
    x = jnp.where(allowed & ~jnp.isnan(logits), logits.astype(jnp.float32), neg_inf)
    certain = x == jnp.inf
    x = jnp.where(certain.any(-1, keepdims=True), jnp.where(certain, 0.0, neg_inf), x)
    top = jnp.max(x, axis=-1, keepdims=True)
    x = jnp.where(top == neg_inf, jnp.where(allowed, 0.0, neg_inf), x - top)
    if isinstance(cfg, RowSettings):
        t, k, p = (jnp.asarray(v)[:, None] for v in (cfg.temperature, cfg.top_k, cfg.top_p))
        x = _filter(x / jnp.where(t > 0, t, 1.0), k, p, cfg.candidates)
    else:
        if cfg.temperature > 0:
            x = x / cfg.temperature
        if cfg.top_k or cfg.top_p < 1:  # no sort of the vocabulary: a bounded top-k
            x = _filter(x, cfg.top_k, cfg.top_p, cfg.top_k or cfg.top_p_candidates)
    return jnp.where(allowed, x, neg_inf)  # whatever the filters did: the guarantee


def _filter(x, top_k, top_p, candidates: int):
    """Keep the `top_k` likeliest (0: all), then the smallest prefix of them whose mass
    reaches `top_p` (the first always; 1: all), ranking among the `candidates` likeliest.
    `top_k`/`top_p` are scalars or [B, 1] columns."""
    neg_inf = jnp.float32(-jnp.inf)
    top = jax.lax.top_k(x, min(candidates, x.shape[-1]))[0]
    in_k = (top_k == 0) | (jnp.arange(top.shape[-1]) < top_k)
    top = jnp.where(in_k, top, neg_inf)
    probs = jax.nn.softmax(top, axis=-1)
    keep = in_k & ((top_p >= 1) | (jnp.cumsum(probs, axis=-1) - probs < top_p))
    cutoff = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1, keepdims=True)
    off = (top_k == 0) & (top_p >= 1)  # nothing to cut (only per row: static skips it)
    return jnp.where(off | (x >= cutoff), x, neg_inf)


def draw(logits, temperature, key):
    """The token drawn from `sampling_logits`' output: its argmax with Gumbel noise (what
    jax.random.categorical does) where temperature > 0, the plain argmax (greedy) where it
    is 0. `temperature` is a number or [B]; `key` one key, or [B] keys (one per row)."""
    if isinstance(temperature, numbers.Real) and temperature == 0:
        return _argmax(logits)
    if jnp.ndim(key):  # one key per row: each row's draw depends only on its own key
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:]))(key)
    else:
        noise = jax.random.gumbel(key, logits.shape)
    return _argmax(logits + jnp.where(jnp.asarray(temperature).reshape(-1, 1) > 0, noise, 0.0))


def decode(step_fn: StepFn, params, cache, prompt, prompt_lengths, init_state,
           tables: modes.VocabTables | None, rng, use_mask, *, cfg: SamplingConfig,
           copy: CopyTables | None = None) -> SampleOutput:
    """Prefill `prompt[B, P]` (each row `[0, ids...]`, right-padded; `prompt_lengths[B]`
    counts the leading 0) and sample up to `cfg.max_new_tokens` per row. Pure; jit it.

    `tables=None` compiles the loop without any mode machinery (no mask, no FSM): the
    baseline against which the mask's cost is measured (bench/sample_throughput.py).
    `copy` (with `tables`): quotes copy each row's source while the mask is on."""
    b, p = prompt.shape
    n = cfg.max_new_tokens
    last, cache = prefill(step_fn, params, cache, prompt, prompt_lengths, cfg.prefill_chunk)
    vocab = last.shape[-1]
    if tables is None:
        unmasked = ~jnp.isin(jnp.arange(vocab), jnp.array(NEVER_SAMPLED))
    else:  # the invalid state's row: what is allowed when the mask is off
        invalid = tables.allowed.shape[0] - 1

    def cond(carry):
        i, *_, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, state, out, done, rng, reach = carry
        rng, key = jax.random.split(rng)
        if tables is None:
            allowed = unmasked
        else:
            allowed = tables.allowed[jnp.where(use_mask, state, invalid)]
        if copy is not None:
            allowed = copy_constrained(
                jnp.broadcast_to(allowed, (b, vocab)),
                use_mask & (tables.state_mode[state] == QUOTE_MODE), reach, copy)
        logits = sampling_logits(logits, allowed, cfg)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token = jnp.where(done, vocab_lib.PAD_ID, draw(logits, cfg.temperature, key))
        log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        mode = modes.INVALID_MODE if tables is None else tables.state_mode[state]
        out = SampleOutput(
            tokens=out.tokens.at[:, i].set(token),
            mode_ids=out.mode_ids.at[:, i].set(jnp.where(done, modes.INVALID_MODE, mode)),
            log_probs=out.log_probs.at[:, i].set(jnp.where(done, 0.0, log_prob)),
            lengths=out.lengths + (~done).astype(jnp.int32),
            final_state=out.final_state)
        if tables is not None:
            after = jnp.where(done, state, tables.next_state[state, token])
            if copy is not None:
                reach = copy_step(reach, copy.source, token,
                                  tables.state_mode[state] == QUOTE_MODE,
                                  tables.state_mode[after] == QUOTE_MODE,
                                  copy.is_redaction[token])
            state = after
        logits, cache = step_fn(params, cache, token[:, None], (prompt_lengths + i)[:, None],
                                (~done).astype(jnp.int32)[:, None])
        done = done | (token == vocab_lib.EOS_ID)
        return i + 1, logits[:, 0], cache, state, out, done, rng, reach

    out = SampleOutput(tokens=jnp.full((b, n), vocab_lib.PAD_ID, jnp.int32),
                       mode_ids=jnp.full((b, n), modes.INVALID_MODE, jnp.int32),
                       log_probs=jnp.zeros((b, n), jnp.float32),
                       lengths=jnp.zeros((b,), jnp.int32), final_state=init_state)
    # a quote the prompt left open copies from anywhere (a source of [B, 0] when off)
    reach = (jnp.zeros((b, 0), bool) if copy is None
             else copy.source != vocab_lib.PAD_ID)
    carry = (jnp.int32(0), last, cache, init_state, out, jnp.zeros((b,), bool), rng, reach)
    _, _, _, state, out, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return out._replace(final_state=state)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SamplingError(f"seed={seed!r} (--seed / evaluate.seed): must be an integer in "
                            f"[0, {MAX_SEED}]")
    return seed


def sampling_key(seed: int):
    """The decode loop's PRNG key: RBG on TPU (its hardware generator; T5X's choice),
    threefry elsewhere, where RBG is emulated: on this CPU the Gumbel noise for 8 x 8192
    logits took 1.25 ms with RBG and 0.44 ms with threefry."""
    check_seed(seed)
    return jax.random.key(seed, impl="rbg" if jax.default_backend() == "tpu" else "threefry2x32")


def _argmax(x):
    """Index of each row's maximum, the lowest on ties, as two plain reductions: XLA:CPU
    runs jnp.argmax's variadic (value, index) reduce unvectorised, and over the vocabulary
    it took 20-30% of a decode step here (bench/sample_throughput.py --profile)."""
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == x.max(axis=-1, keepdims=True), ids, x.shape[-1]), axis=-1)


def prefill(step_fn: StepFn, params, cache, prompt, prompt_lengths, chunk: int, segment=1):
    """Feed the right-padded prompt to the model `chunk` tokens per call (a `lax.scan`
    over the full chunks, then the rest), so attention and logits memory stay bounded
    for long prompts; the prompt's slots get segment id `segment` (a number or [B]), the
    padding 0. Returns each row's logits after its last prompt token, and the cache."""
    b, p = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), prompt.shape)
    segments = jnp.where(positions < prompt_lengths[:, None],
                         jnp.asarray(segment, jnp.int32).reshape(-1, 1), 0)

    def run(cache, last, start, size):
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
        logits, cache = step_fn(params, cache, cut(prompt), cut(positions), cut(segments))
        idx = prompt_lengths - 1 - start
        picked = jnp.take_along_axis(logits, jnp.clip(idx, 0, size - 1)[:, None, None],
                                     axis=1)[:, 0]
        return cache, jnp.where(((idx >= 0) & (idx < size))[:, None], picked, last)

    full, rest = divmod(p, chunk) if p > chunk else (0, p)
    shape = jax.eval_shape(step_fn, params, cache, *(x[:, :min(p, chunk)]
                                                     for x in (prompt, positions, segments)))
    last = jnp.zeros((b, shape[0].shape[-1]), shape[0].dtype)
    if full:
        (cache, last), _ = jax.lax.scan(
            lambda carry, start: (run(*carry, start, chunk), None), (cache, last),
            jnp.arange(full, dtype=jnp.int32) * chunk)
    if rest:
        cache, last = run(cache, last, full * chunk, rest)
    return last, cache


# ---------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt as the model sees it: tagged text, its ids and the policy state after it
    (where the policy's document begins: after the user's turn, if any)."""

    text: str
    ids: tuple[int, ...]
    state: int


def make_prompt(text: str, vocab, policy: modes.Policy | str, mode: str | None = None,
                raw: bool = False, names: tuple[str, str] = ("--prompt", "--mode")) -> Prompt:
    """Turn user text into a prompt under `policy`.

    Plain text is escaped (a typed `<ai>` stays text) and `mode` opens a span, as a chat
    template's generation prompt does. With `mode="ai"` the text is the user's turn, as in
    the corpus's conversations, where a human's words come in a human span and the ai span
    answers them: `<human>text</human>`, a newline, then `<ai>`. The user's turn is
    context: the policy governs the document the model writes from `<ai>` on (left
    untagged, a first-person story is one the model tends to go on telling as its
    narrator). With `raw=True` the text is taken as tagged text, used as is, and must be a
    valid prefix under the policy. Errors name the text and the mode as `names` (the CLI's
    flags by default).
    """
    name = modes.get_policy(policy).name
    prompt_name, mode_name = names
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 (a shell passes them on)
        raise SamplingError(f"{prompt_name}: not valid UTF-8 at character {e.start}; pass the "
                            "prompt as UTF-8 text") from None
    if mode is not None and mode not in ("human", "ai"):
        raise SamplingError(f"{mode_name} {mode}: choose human or ai (quotes open inside ai)")
    tagged = text if raw else tags.escape(text)
    turn = ""
    if mode == "ai" and text and not raw:
        turn, tagged = chat.render([("user", text)]), ""
    if mode is not None:
        tagged += f"<{mode}>"
    try:
        state = tags.prefix_state(tagged, policy)
    except tags.TagError as e:
        where = f"{prompt_name} (raw)" if raw and e.offset < len(text) else f"{mode_name} {mode}"
        raise SamplingError(f"{where} breaks policy {name!r}: {e}") from None
    return Prompt(turn + tagged, tuple(vocab.encode(turn + tagged)), state)


def chat_prompt(messages, vocab, policy: modes.Policy | str) -> Prompt:
    """The chat template's prompt (`chat.render`): the messages as context, then the
    assistant's opening tag, where the policy's document begins."""
    try:
        state = tags.prefix_state(chat.OPENER, policy)
    except tags.TagError as e:
        raise SamplingError(f"policy {modes.get_policy(policy).name!r} cannot chat (the "
                            f"assistant's turn opens {chat.OPENER}): {e}") from None
    text = chat.render(messages) + chat.OPENER
    return Prompt(text, tuple(vocab.encode(text)), state)


def decode_text(vocab, tokens: np.ndarray, length: int) -> str:
    """Tagged text of one row's new tokens (EOS dropped), faithful to their modes."""
    return vocab_lib.decode_tagged(vocab, tokens[:length])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Sample:
    """One finished row: tagged text, its tokens, the mode of each token, log-probs."""

    prompt: str
    text: str
    tokens: tuple[int, ...]
    modes: tuple[str, ...]
    log_probs: tuple[float, ...]
    ended: bool  # emitted EOS (False: stopped at max_new_tokens)
    initial_state: str  # policy state after the prompt, where the sample began
    final_state: str


def model_step(model_cfg) -> StepFn:
    """The decoder as a `StepFn`: appends the tokens to the cache, returns their logits."""
    model = model_lib.Decoder(model_cfg)

    def step_fn(params, cache, tokens, positions, segments):
        logits, variables = model.apply({"params": params, "cache": cache}, tokens, positions,
                                        segments, decode=True, mutable=["cache"])
        return logits, variables["cache"]

    return step_fn


@functools.lru_cache(maxsize=32)
def _compiled_decode(model_cfg, cfg: SamplingConfig, mesh, batch: int, prompt_len: int,
                     masked: bool = True):
    """The jitted prefill + decode loop for one shape; shared by every Sampler, so a new
    policy with the same number of states reuses the compiled program (tables are
    arguments, not constants)."""
    total = prompt_len + cfg.max_new_tokens
    cache_sharding = partitioning.param_shardings(
        model_lib.abstract_cache(model_cfg, batch, total), mesh)
    step_fn = model_step(model_cfg)

    def run(params, tables, prompt, lengths, init_state, rng, use_mask, copy=None):
        cache = jax.lax.with_sharding_constraint(
            model_lib.init_cache(model_cfg, batch, total), cache_sharding)
        return decode(step_fn, params, cache, prompt, lengths, init_state,
                      modes.VocabTables(*tables) if masked else None, rng, use_mask, cfg=cfg,
                      copy=CopyTables(*copy) if copy is not None else None)

    return jax.jit(run, out_shardings=partitioning.batch_sharding(mesh))


class Sampler:
    """A `model.Decoder` with parameters on a mesh, a vocabulary and a policy.

    `generate` compiles once per (batch size, prompt-length bucket of 16); the mask switch
    and the seed are runtime arguments.
    """

    def __init__(self, model_cfg, params, vocab, policy: modes.Policy | str, mesh,
                 cfg: SamplingConfig = SamplingConfig()):
        self.model_cfg, self.params, self.vocab, self.mesh, self.cfg = (
            model_cfg, params, vocab, mesh, cfg)
        self.policy = modes.get_policy(policy)
        self.policy_tables = self.policy.compile()
        if cfg.top_k > vocab.vocab_size:
            raise SamplingError(f"top_k={cfg.top_k} exceeds the vocabulary's "
                                f"{vocab.vocab_size} ids (--top_k / evaluate.top_k); use "
                                "0 (off) or a smaller value")
        self.token_class = vocab_lib.model_token_classes(vocab_lib.token_classes(vocab),
                                                         model_cfg.vocab_size)
        self.tables = mask_tables(self.policy, self.token_class)
        self._device_tables = jax.device_put(tuple(self.tables), partitioning.replicated(mesh))
        self._copy_ids = jax.device_put(
            (self.token_class == modes.TEXT,
             self.token_class == modes.TAG_CLASS["<redacted/>"]), partitioning.replicated(mesh))
        self._multiple = partitioning.batch_size_multiple(mesh)
        self._batch_sharding = partitioning.batch_sharding(mesh)

    def generate(self, prompts: list[Prompt], seed: int = 0,
                 use_mask: bool = True) -> list[Sample]:
        """Sample one continuation per prompt (repeat a prompt for several samples)."""
        if not prompts:
            return []
        longest = max(len(p.ids) for p in prompts) + 1  # + the leading 0
        total = longest + self.cfg.max_new_tokens
        if total > self.model_cfg.max_len:
            raise SamplingError(
                f"prompt ({longest - 1} tokens) + max_new_tokens ({self.cfg.max_new_tokens}) "
                f"exceeds the model's context of {self.model_cfg.max_len}; lower "
                "--max_new_tokens or shorten the prompt")
        batch = _round_up(len(prompts), self._multiple)
        width = min(_round_up(longest, 16), self.model_cfg.max_len - self.cfg.max_new_tokens)
        prompt = np.zeros((batch, width), np.int32)
        lengths = np.ones((batch,), np.int32)
        state = np.full((batch,), self.policy_tables.initial, np.int32)
        source = np.full((batch, width), vocab_lib.PAD_ID, np.int32)
        for r, p in enumerate(prompts):
            prompt[r, 1:len(p.ids) + 1] = p.ids
            lengths[r] = len(p.ids) + 1
            state[r] = p.state
            if self.cfg.copy_quotes:
                turn = copy_source(p.ids, self.token_class)
                source[r, :len(turn)] = turn
        run = _compiled_decode(self.model_cfg, self.cfg, self.mesh, batch, width)
        put = lambda x: jax.device_put(x, self._batch_sharding)
        copy = (put(source), *self._copy_ids) if self.cfg.copy_quotes else None
        with partitioning.activate(self.mesh):
            out = run(self.params, self._device_tables, put(prompt), put(lengths), put(state),
                      sampling_key(seed), jnp.asarray(use_mask), copy)
        out = jax.tree.map(np.asarray, out)
        names = self.policy_tables.states + ("<invalid>",)
        samples = []
        for r, p in enumerate(prompts):
            n = int(out.lengths[r])
            samples.append(Sample(
                prompt=p.text, text=decode_text(self.vocab, out.tokens[r], n),
                tokens=tuple(int(t) for t in out.tokens[r, :n]),
                modes=tuple(modes.MODES[m] if m >= 0 else "<invalid>"
                            for m in out.mode_ids[r, :n]),
                log_probs=tuple(float(x) for x in out.log_probs[r, :n]),
                ended=bool(n and out.tokens[r, n - 1] == vocab_lib.EOS_ID),
                initial_state=names[p.state], final_state=names[int(out.final_state[r])]))
        return samples
