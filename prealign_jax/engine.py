"""Continuous batching: requests join and leave a fixed set of decode rows between decode
calls, each row drawing under its own policy, mask switch, sampling settings and seed.

The device holds `max_batch` rows of KV cache. The model's cache has one write index for
all rows and a row sees only the slots carrying its own segment id, so rows at different
stages live side by side: a request joining row r is prefilled alone ([1, P], P a prompt
bucket) into a fresh one-row cache written from the batch's index on, and that row
replaces row r (its previous occupant's slots go with it). Three kinds of jitted programs,
compiled ahead of time at start-up (no compilation while serving):

- `admit` (one per prompt bucket): the prefill above;
- `step`: `steps_per_call` decode steps for every row (idle rows feed padding that no row
  sees), with the transition mask of each row's policy — all the allowed policies' tables
  stacked into one, a row's state offset into its policy's block — and, in a row that
  asked for faithful quotes (`Request.copy_quotes`), the copy constraint inside a quote
  (`sampling.copy_constrained`: the row carries its user turn and the copy's reach);
- `compact`: when the write index would run past the cache, each row's live slots move to
  the front (order kept), so the cache needs only 2 x max_len + steps_per_call slots.

The host side is one thread (`Engine`): it admits waiting requests into free rows, runs a
step, hands each request its new tokens through its callbacks, and frees the rows whose
request ended or was cancelled (a client that went away frees its row at the next step).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prealign_jax import model as model_lib, modes, partitioning, sampling
from prealign_jax import vocab as vocab_lib

MIN_BUCKET = 16  # the shortest prompt bucket; buckets double up to the context


class Rows(NamedTuple):
    """Everything the device keeps per row between calls (a pytree, donated each call)."""

    cache: Any  # the model's KV cache, max_batch rows
    logits: Any  # [B, V] float32: the next token's logits
    position: Any  # [B] int32: the next token's position
    segment: Any  # [B] int32: the row's segment id in the cache (0 = idle)
    state: Any  # [B] int32: policy state, in the stacked tables' numbering
    invalid: Any  # [B] int32: the invalid state of the row's policy (its mask-off row)
    use_mask: Any  # [B] bool
    remaining: Any  # [B] int32: tokens still to draw (0 = idle or finished)
    stop_token: Any  # [B] int32: an id that ends the request (-1: only EOS does)
    temperature: Any  # [B] float32
    top_k: Any  # [B] int32
    top_p: Any  # [B] float32
    key: Any  # [B, 2] uint32: the row's PRNG key data (threefry)
    copy: Any  # [B] bool: quotes copy the row's user turn (`sampling.copy_quotes`)
    source: Any  # [B, max_len] int32: the row's user turn (`sampling.copy_source`), PAD after
    reach: Any  # [B, max_len] bool: source positions a quote's copy may continue from


class StepOutput(NamedTuple):
    tokens: Any  # [B, K] int32; PAD_ID where the row drew nothing
    mode_ids: Any  # [B, K] int32: the mode each token was drawn in
    log_probs: Any  # [B, K] float32, under the distribution drawn from
    remaining: Any  # [B] int32 after the call: 0 = the row's request ended
    state: Any  # [B] int32 after the call (stacked numbering)
    steps: Any  # int32: decode steps run (fewer than K once every row is idle)


def stack_tables(tables: Sequence[modes.VocabTables]) -> tuple[modes.VocabTables, list[int]]:
    """One table for several policies over the same vocabulary: policy i's states (its
    invalid state included) are numbered from `offsets[i]` on."""
    offsets = list(np.cumsum([0] + [t.allowed.shape[0] for t in tables[:-1]]))
    return modes.VocabTables(
        np.concatenate([t.allowed for t in tables]),
        np.concatenate([t.next_state + o for t, o in zip(tables, offsets)]).astype(np.int32),
        np.concatenate([t.state_mode for t in tables]).astype(np.int32)), offsets


def _cache_axes(model_cfg, slots: int):
    """Per cache leaf: (kind, batch axis, slot axis); kind is 'index', 'segment' or 'kv'.
    Found by comparing abstract caches that differ in one dimension only, so it holds for
    scanned layers too."""
    def shapes(batch, length):
        return jax.tree.map(lambda x: x.shape,
                            nn.unbox(model_lib.abstract_cache(model_cfg, batch, length)))

    def differing(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    base, wide, long = shapes(1, slots), shapes(2, slots), shapes(1, slots - 1)
    leaf = lambda x: isinstance(x, tuple)
    kinds = jax.tree_util.tree_map_with_path(
        lambda path, _: ("index" if "cache_index" in str(path[-1]) else
                         "segment" if "cached_segment" in str(path[-1]) else "kv"),
        base, is_leaf=leaf)
    return jax.tree.map(lambda k, a, b, c: (k, differing(a, b), differing(a, c)),
                        kinds, base, wide, long, is_leaf=leaf)


def _index_of(cache, axes):
    kinds = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3)
    leaf = next(x for x, (k, *_) in zip(jax.tree.leaves(cache), kinds) if k == "index")
    return jnp.ravel(leaf)[0]


def _with_index(cache, axes, index):
    return jax.tree.map(lambda x, a: jnp.full_like(x, index) if a[0] == "index" else x,
                        cache, axes, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3)


def check_max_batch(max_batch: int, mesh) -> None:
    """Rows split evenly over the mesh's batch devices."""
    multiple = partitioning.batch_size_multiple(mesh)
    if max_batch < 1 or max_batch % multiple:
        raise sampling.SamplingError(f"--max_batch={max_batch}: must be a positive "
                                     f"multiple of the mesh's {multiple} batch devices")


@dataclasses.dataclass
class Request:
    """One sequence to draw. Callbacks run on the engine's thread: `on_tokens(tokens,
    mode_names, log_probs)` with each call's new tokens, then `on_done(final_state_name)`
    once, or `on_error(exception)` if the engine failed it."""

    prompt_ids: Sequence[int]
    policy: str
    state: int  # policy state after the prompt (tags.prefix_state)
    max_new_tokens: int
    on_tokens: Callable
    on_done: Callable
    on_error: Callable
    use_mask: bool = True
    stop_token: int = -1
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 0
    copy_quotes: bool = False  # quotes copy the user's turn (mask on only; sampling.py)
    cancelled: bool = False  # set by the client's side: the row is freed at the next step


@dataclasses.dataclass
class Stats:
    """Counters since start-up (read by the server's /metrics)."""

    calls: int = 0  # step calls
    steps: int = 0  # decode steps run
    row_steps: int = 0  # tokens drawn (rows active per step, summed)
    prompt_tokens: int = 0  # prompt tokens prefilled
    admitted: int = 0
    compactions: int = 0


class Engine:
    """Serve `Request`s from a thread: `start()`, `submit()`, `stop()`."""

    def __init__(self, model_cfg, params, token_class: np.ndarray, policies: Sequence[str],
                 mesh, *, max_batch: int = 16, steps_per_call: int = 8,
                 candidates: int = 256, prefill_chunk: int = 512,
                 progress: Callable[[str], None] = lambda line: None):
        check_max_batch(max_batch, mesh)
        self.model_cfg, self.params, self.mesh = model_cfg, params, mesh
        self.max_batch, self.steps_per_call, self.candidates = (
            max_batch, steps_per_call, candidates)
        self.policies = [modes.get_policy(p).name for p in policies]
        tables, self._offsets = stack_tables(
            [sampling.mask_tables(p, token_class) for p in self.policies])
        self._states = [s for p in self.policies
                        for s in modes.get_policy(p).compile().states + ("<invalid>",)]
        self._tables = jax.device_put(tuple(tables), partitioning.replicated(mesh))
        self.token_class = token_class
        self._copy_ids = jax.device_put((token_class == modes.TEXT,
                                         token_class == modes.TAG_CLASS["<redacted/>"]),
                                        partitioning.replicated(mesh))
        self.slots = 2 * model_cfg.max_len + steps_per_call
        self.buckets = [b for b in (MIN_BUCKET * 2 ** i for i in range(32))
                        if b < model_cfg.max_len] + [model_cfg.max_len]
        self._axes = _cache_axes(model_cfg, self.slots)
        self._step_fn = sampling.model_step(model_cfg)
        self._prefill_chunk = prefill_chunk
        self.stats = Stats()
        self._waiting: queue.Queue[Request | None] = queue.Queue()
        self._rows: list[Request | None] = []
        self._next_segment = 1
        self._compile(progress)
        self._thread = threading.Thread(target=self._serve, name="prealign-engine",
                                        daemon=True)
        self._stopping = False

    # ------------------------------------------------------------ the jitted programs
    def _empty_rows(self) -> Rows:
        b, v, n = self.max_batch, self.model_cfg.vocab_size, self.model_cfg.max_len
        zeros = lambda dtype: jnp.zeros((b,), dtype)
        return Rows(model_lib.init_cache(self.model_cfg, b, self.slots),
                    jnp.zeros((b, v), jnp.float32), zeros(jnp.int32), zeros(jnp.int32),
                    zeros(jnp.int32), zeros(jnp.int32), zeros(bool), zeros(jnp.int32),
                    jnp.full((b,), -1, jnp.int32), zeros(jnp.float32), zeros(jnp.int32),
                    jnp.ones((b,), jnp.float32), jnp.zeros((b, 2), jnp.uint32), zeros(bool),
                    jnp.full((b, n), vocab_lib.PAD_ID, jnp.int32), jnp.zeros((b, n), bool))

    def _admit(self, params, rows: Rows, row, prompt, length, segment, state, invalid,
               use_mask, remaining, stop_token, temperature, top_k, top_p, key, copy,
               source) -> Rows:
        index = _index_of(rows.cache, self._axes)
        one = _with_index(model_lib.init_cache(self.model_cfg, 1, self.slots), self._axes,
                          index)
        last, one = sampling.prefill(self._step_fn, params, one, prompt, length[None],
                                     self._prefill_chunk, segment)

        def put(batch, single, axes):
            kind, batch_axis, _ = axes
            if kind == "index":
                return jnp.full_like(batch, index + length)
            return jax.lax.dynamic_update_slice_in_dim(batch, single, row, batch_axis)

        cache = jax.tree.map(put, rows.cache, one, self._axes,
                             is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3)
        # a quote the prompt left open copies from anywhere in the turn
        values = (last[0].astype(jnp.float32), length, segment, state, invalid, use_mask,
                  remaining, stop_token, temperature, top_k, top_p, key, copy, source,
                  source != vocab_lib.PAD_ID)
        return Rows(cache, *(old.at[row].set(new) for old, new in zip(rows[1:], values)))

    def _step(self, params, rows: Rows, tables, copy_ids, cancel) -> tuple[Rows, StepOutput]:
        tables = modes.VocabTables(*tables)
        b, k = self.max_batch, self.steps_per_call
        settings = sampling.RowSettings(rows.temperature, rows.top_k, rows.top_p,
                                        self.candidates)
        rows = rows._replace(remaining=jnp.where(cancel, 0, rows.remaining))
        out = StepOutput(jnp.full((b, k), vocab_lib.PAD_ID, jnp.int32),
                         jnp.full((b, k), modes.INVALID_MODE, jnp.int32),
                         jnp.zeros((b, k), jnp.float32), None, None, None)

        def cond(carry):
            i, rows, _ = carry
            return (i < k) & jnp.any(rows.remaining > 0)

        def body(carry):
            i, rows, out = carry
            active = rows.remaining > 0
            allowed = tables.allowed[jnp.where(rows.use_mask, rows.state, rows.invalid)]
            was_quote = tables.state_mode[rows.state] == sampling.QUOTE_MODE
            copy = sampling.CopyTables(rows.source, *copy_ids)
            allowed = sampling.copy_constrained(
                allowed, active & rows.copy & rows.use_mask & was_quote, rows.reach, copy)
            logits = sampling.sampling_logits(rows.logits, allowed, settings)
            keys = jax.vmap(lambda key, pos: jax.random.fold_in(
                jax.random.wrap_key_data(key, impl="threefry2x32"), pos))(rows.key,
                                                                          rows.position)
            token = jnp.where(active, sampling.draw(logits, rows.temperature, keys),
                              vocab_lib.PAD_ID)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                           token[:, None], axis=-1)[:, 0]
            out = out._replace(
                tokens=out.tokens.at[:, i].set(token),
                mode_ids=out.mode_ids.at[:, i].set(
                    jnp.where(active, tables.state_mode[rows.state], modes.INVALID_MODE)),
                log_probs=out.log_probs.at[:, i].set(jnp.where(active, log_prob, 0.0)))
            logits, cache = self._step_fn(params, rows.cache, token[:, None],
                                          rows.position[:, None],
                                          jnp.where(active, rows.segment, 0)[:, None])
            ended = (token == vocab_lib.EOS_ID) | (token == rows.stop_token)
            state = jnp.where(active, tables.next_state[rows.state, token], rows.state)
            copying = active & rows.copy
            reach = jax.lax.cond(  # skipped while no row asked for faithful quotes
                copying.any(), lambda: jnp.where(copying[:, None], sampling.copy_step(
                    rows.reach, rows.source, token, was_quote,
                    tables.state_mode[state] == sampling.QUOTE_MODE,
                    copy.is_redaction[token]), rows.reach), lambda: rows.reach)
            rows = rows._replace(
                cache=cache, logits=jnp.where(active[:, None], logits[:, 0], rows.logits),
                position=rows.position + active, state=state,
                reach=reach,
                remaining=jnp.where(active & ~ended, rows.remaining - 1, 0))
            return i + 1, rows, out

        steps, rows, out = jax.lax.while_loop(cond, body, (jnp.int32(0), rows, out))
        rows = rows._replace(segment=jnp.where(rows.remaining > 0, rows.segment, 0))
        return rows, out._replace(remaining=rows.remaining, state=rows.state, steps=steps)

    def _compact(self, rows: Rows) -> Rows:
        """Move each row's live slots (its segment's) to the front, order kept; the rest
        become padding. The write index drops to the longest row."""
        segments = next(x for x, (kind, *_) in zip(
            jax.tree.leaves(rows.cache),
            jax.tree.leaves(self._axes, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3))
            if kind == "segment")
        segments = segments.reshape(-1, *segments.shape[-2:])[0]  # [B, S] (first layer)
        live = (segments == rows.segment[:, None]) & (rows.segment[:, None] > 0)
        order = jnp.argsort(~live, axis=-1, stable=True)  # live slots first, in order
        count = live.sum(-1)
        kept = jnp.arange(self.slots)[None] < count[:, None]

        def move(x, axes):
            kind, batch_axis, slot_axis = axes
            if kind == "index":
                return jnp.full_like(x, count.max())
            shape = [1] * x.ndim
            shape[batch_axis], shape[slot_axis] = self.max_batch, self.slots
            moved = jnp.take_along_axis(x, order.reshape(shape), axis=slot_axis)
            return jnp.where(kept.reshape(shape), moved, 0) if kind == "segment" else moved

        return rows._replace(cache=jax.tree.map(
            move, rows.cache, self._axes,
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3))

    def _compile(self, progress) -> None:
        """Compile every program ahead of time: serving never compiles."""
        start = time.perf_counter()
        rows = self._empty_rows()
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
        with partitioning.activate(self.mesh):
            self._admit_programs = {}
            for i, bucket in enumerate(self.buckets):
                progress(f"compiling the prompt bucket of {bucket} tokens "
                         f"({i + 1}/{len(self.buckets)})")
                self._admit_programs[bucket] = jax.jit(self._admit, donate_argnums=1).lower(
                    self.params, rows, scalar(jnp.int32),
                    jax.ShapeDtypeStruct((1, bucket), jnp.int32), *(scalar(jnp.int32),) * 4,
                    scalar(bool), scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.float32),
                    scalar(jnp.int32), scalar(jnp.float32),
                    jax.ShapeDtypeStruct((2,), jnp.uint32), scalar(bool),
                    jax.ShapeDtypeStruct((self.model_cfg.max_len,), jnp.int32)).compile()
            progress(f"compiling the decode step ({self.max_batch} rows x "
                     f"{self.steps_per_call} steps) and the cache compaction")
            self._step_program = jax.jit(self._step, donate_argnums=1).lower(
                self.params, rows, self._tables, self._copy_ids,
                jax.ShapeDtypeStruct((self.max_batch,), bool)).compile()
            self._compact_program = jax.jit(self._compact, donate_argnums=0).lower(
                rows).compile()
        # the cache's write index, mirrored on the host; slots each row's request holds
        self._reset()
        progress(f"compiled {len(self.buckets) + 2} programs in "
                 f"{time.perf_counter() - start:.1f}s")

    # ------------------------------------------------------------ the host side
    def bucket(self, prompt_tokens: int) -> int:
        """The prompt bucket of a prompt (its leading 0 included)."""
        return next(b for b in self.buckets if b >= prompt_tokens)

    def state_offset(self, policy: str) -> int:
        return self._offsets[self.policies.index(policy)]

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        if request.policy not in self.policies:
            raise sampling.SamplingError(f"policy {request.policy!r} is not served")
        if len(request.prompt_ids) + 1 + request.max_new_tokens > self.model_cfg.max_len:
            raise sampling.SamplingError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) exceeds the model's context of "
                f"{self.model_cfg.max_len}")
        self._waiting.put(request)

    def stop(self) -> None:
        """Finish the requests in flight and waiting, then end the thread."""
        self._stopping = True
        self._waiting.put(None)
        if self._thread.is_alive():
            self._thread.join()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._rows)

    def _serve(self) -> None:
        pending: list[Request] = []
        while True:
            block = not pending and self.active == 0
            try:
                while True:
                    item = self._waiting.get(block=block)
                    block = False
                    if item is not None:
                        pending.append(item)
            except queue.Empty:
                pass
            if self._stopping and not pending and self.active == 0:
                return
            pending = [r for r in pending if not r.cancelled]  # gone before they got a row
            while pending and None in self._rows:
                request = pending.pop(0)
                try:
                    self._admit_one(request)
                except Exception as e:  # noqa: BLE001 - that request fails, not the engine
                    request.on_error(e)
            if self.active:
                try:
                    self._step_once()
                except Exception as e:  # noqa: BLE001 - the rows fail, the engine goes on
                    failed = [r for r in self._rows if r is not None]
                    self._reset()
                    for r in failed:
                        r.on_error(e)

    def _reset(self) -> None:
        """Empty rows and cache (after a failed step: the donated device state is gone)."""
        self._device_rows, self._index = self._empty_rows(), 0
        self._rows, self._live = [None] * self.max_batch, [0] * self.max_batch

    def _ensure_room(self, slots: int) -> None:
        if self._index + slots > self.slots:
            self._device_rows = self._compact_program(self._device_rows)
            self._index = max(self._live)
            self.stats.compactions += 1

    def _admit_one(self, r: Request) -> None:
        length = len(r.prompt_ids) + 1  # the leading 0 of every document
        bucket = self.bucket(length)
        self._ensure_room(bucket)
        row = self._rows.index(None)
        prompt = np.zeros((1, bucket), np.int32)
        prompt[0, 1:length] = r.prompt_ids
        offset = self.state_offset(r.policy)
        invalid = offset + len(modes.get_policy(r.policy).compile().states)
        key = np.asarray(jax.random.key_data(jax.random.key(r.seed, impl="threefry2x32")))
        source = np.full((self.model_cfg.max_len,), vocab_lib.PAD_ID, np.int32)
        if r.copy_quotes:
            turn = sampling.copy_source(r.prompt_ids, self.token_class)
            source[:len(turn)] = turn
        self._device_rows = self._admit_programs[bucket](
            self.params, self._device_rows, np.int32(row), prompt, np.int32(length),
            np.int32(self._next_segment), np.int32(offset + r.state), np.int32(invalid),
            np.bool_(r.use_mask), np.int32(r.max_new_tokens), np.int32(r.stop_token),
            np.float32(r.temperature), np.int32(r.top_k), np.float32(r.top_p), key,
            np.bool_(r.copy_quotes), source)
        self._next_segment = self._next_segment % (2 ** 31 - 1) + 1
        self._index += length
        self._rows[row], self._live[row] = r, length
        self.stats.admitted += 1
        self.stats.prompt_tokens += len(r.prompt_ids)

    def _step_once(self) -> None:
        self._ensure_room(self.steps_per_call)
        cancel = np.array([r is not None and r.cancelled for r in self._rows])
        self._device_rows, out = self._step_program(self.params, self._device_rows,
                                                    self._tables, self._copy_ids, cancel)
        out = jax.tree.map(np.asarray, out)
        steps = int(out.steps)
        self._index += steps
        self.stats.calls += 1
        self.stats.steps += steps
        for row, r in enumerate(self._rows):
            if r is None:
                continue
            drawn = out.tokens[row, :steps] != vocab_lib.PAD_ID
            n = int(drawn.sum())
            self.stats.row_steps += n
            self._live[row] += n
            if n and not r.cancelled:
                r.on_tokens([int(t) for t in out.tokens[row, :n]],
                            [modes.MODES[m] if m >= 0 else "<invalid>"
                             for m in out.mode_ids[row, :n]],
                            [float(x) for x in out.log_probs[row, :n]])
            if out.remaining[row] == 0:
                self._rows[row], self._live[row] = None, 0
                if not r.cancelled:
                    r.on_done(self._states[int(out.state[row])])

