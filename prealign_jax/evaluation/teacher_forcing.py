"""Teacher-forced scoring: sequences packed into rows as in training and read through the
model once, giving each token's NLL and the probability mass a transition mask would take
away where it was drawn (the held-out loss and the mask pressure both come from here)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prealign_jax import inference, model as model_lib, partitioning


def forbidden_mass(logits, allowed):
    """Softmax probability (temperature 1) of the tokens `allowed` excludes, per position:
    the mass a transition mask removes there. logits [..., V] float, allowed [..., V]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.where(allowed, 0.0, probs), axis=-1)


@dataclasses.dataclass
class Packed:
    """Sequences packed into rows as in training: inputs are the targets shifted right,
    with a 0 where each sequence starts; `where[i]` = (row, offset) of sequence i."""

    inputs: np.ndarray  # [R, L] int32
    targets: np.ndarray
    positions: np.ndarray
    segments: np.ndarray  # 0: padding
    states: np.ndarray  # policy state each target is read in (indexes the allowed table)
    where: list[tuple[int, int]]


def pack(seqs: Sequence[np.ndarray], states: Sequence[np.ndarray], length: int,
         rows_multiple: int, pad_state: int) -> Packed:
    """Greedy next-fit packing of sequences of at most `length` tokens; the row count is
    rounded up to `rows_multiple` (padding rows read in `pad_state`)."""
    where, row, used = [], -1, length
    for i, s in enumerate(seqs):
        if not 0 < len(s) <= length:
            raise ValueError(f"sequence {i} has {len(s)} tokens; pack takes 1..{length}")
        if used + len(s) > length:
            row, used = row + 1, 0
        where.append((row, used))
        used += len(s)
    num_rows = -(-max(row + 1, 1) // rows_multiple) * rows_multiple
    out = {k: np.zeros((num_rows, length), np.int32)
           for k in ("inputs", "targets", "positions", "segments")}
    out["states"] = np.full((num_rows, length), pad_state, np.int32)
    for i, (s, (r, o)) in enumerate(zip(seqs, where)):
        n = len(s)
        out["targets"][r, o:o + n] = s
        out["inputs"][r, o + 1:o + n] = s[:-1]
        out["positions"][r, o:o + n] = np.arange(n)
        out["segments"][r, o:o + n] = i + 1
        out["states"][r, o:o + n] = states[i]
    return Packed(where=where, **out)


@functools.lru_cache(maxsize=8)
def _teacher_forced_fn(model_cfg: model_lib.ModelConfig):
    model = model_lib.Decoder(model_cfg)

    def run(params, inputs, targets, positions, segments, states, allowed):
        logits = model.apply({"params": params}, inputs, positions, segments)
        return (model_lib.cross_entropy(logits, targets),
                forbidden_mass(logits, allowed[states]))

    return jax.jit(run)


def teacher_forced(run: inference.Run, seqs: Sequence[np.ndarray],
                   states: Sequence[np.ndarray], allowed: np.ndarray, rows: int = 16):
    """Per-token (NLL, forbidden mass) of each sequence's tokens given the ones before it.

    `states[i][t]` is the row of `allowed` [S, V] in force when token t of sequence i was
    drawn. Returns two lists of float arrays shaped like `seqs`."""
    mesh = run.mesh
    multiple = partitioning.batch_size_multiple(mesh)
    rows = -(-rows // multiple) * multiple
    packed = pack(seqs, states, run.model_cfg.max_len, rows, pad_state=0)
    fn = _teacher_forced_fn(run.model_cfg)
    put = functools.partial(jax.device_put, device=partitioning.batch_sharding(mesh))
    allowed = jax.device_put(np.asarray(allowed), partitioning.replicated(mesh))
    nll, mass = [], []
    with partitioning.activate(mesh):
        for r in range(0, packed.inputs.shape[0], rows):
            chunk = [put(getattr(packed, k)[r:r + rows]) for k in
                     ("inputs", "targets", "positions", "segments", "states")]
            a, b = fn(run.params, *chunk, allowed)
            nll.append(np.asarray(a))
            mass.append(np.asarray(b))
    nll, mass = np.concatenate(nll), np.concatenate(mass)
    return ([nll[r, o:o + len(s)] for s, (r, o) in zip(seqs, packed.where)],
            [mass[r, o:o + len(s)] for s, (r, o) in zip(seqs, packed.where)])
