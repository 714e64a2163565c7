"""A trained run, loaded for inference, and the `prealign sample` command.

A run directory holds what `prealign train` wrote: `config.gin` (the operative config,
parsed by the CLI before the user's own gin files and overrides), `checkpoints/` and, from
`prealign prepare`, `data/vocab.model`. Only the parameters are restored (not the
optimizer state), directly into the shardings of the current mesh, so a checkpoint saved on
one mesh samples on another.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from prealign_jax import model as model_lib, partitioning, policy_config, sampling, tags
from prealign_jax import train  # noqa: F401  registers the configurables of config.gin
from prealign_jax import vocab as vocab_lib
from prealign_jax.data import prepare
from prealign_jax.errors import UserError

class RunError(UserError):
    """A run directory that cannot be used for inference (names it and what to do)."""


@dataclasses.dataclass
class Run:
    model_cfg: model_lib.ModelConfig
    params: Any
    vocab: Any
    mesh: Any
    step: int


def load_run(workdir: str) -> Run:
    """Model config and mesh (from the parsed gin: the run's config.gin, then the user's
    overrides, e.g. --gin.MeshConfig.data=8), vocabulary and the latest parameters."""
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) \
        if os.path.isdir(directory) else []
    if not steps:
        raise RunError(f"--workdir={workdir}: no checkpoint in {directory}; train first "
                       f"(prealign train --workdir={workdir})")
    model_cfg = gin.get_configurable("ModelConfig")()
    data_dir = gin.query_parameter("seqio_data.data_dir") or os.path.join(workdir, "data")
    vocab = vocab_lib.load(os.path.join(data_dir, prepare.VOCAB_FILE))
    device_mesh = gin.get_configurable("MeshConfig")().make()
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(model_lib.Decoder(model_cfg).init, jax.random.key(0),
                           dummy, dummy, dummy)["params"]
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(boxed), partitioning.param_shardings(boxed, device_mesh))
    item = {"params": abstract}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, str(steps[-1]), "state"),
        args=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                                        item)))
    return Run(model_cfg, restored["params"], vocab, device_mesh, steps[-1])


def mode_runs(mode_names) -> str:
    """'ai x12, quote x3, ai x5': the modes of a sample, run-length encoded."""
    runs: list[list] = []
    for m in mode_names:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return ", ".join(f"{m} x{n}" for m, n in runs)


def well_formed(sample: sampling.Sample) -> bool | None:
    """Whether a finished sample, prompt included, is a valid document under the grammar;
    None for a sample cut off at max_new_tokens (it cannot be judged)."""
    if not sample.ended:
        return None
    try:
        tags.validate(sample.prompt + sample.text)
    except tags.TagError:
        return False
    return True


def command(args) -> None:
    """`prealign sample --workdir=W --policy assistant --mode ai --prompt "..."`."""
    if not args.workdir:
        raise RunError("prealign sample needs --workdir=DIR (a trained run)")
    known = policy_config.policies()
    if args.policy not in known:
        raise RunError(f"--policy {args.policy}: unknown; known policies: {sorted(known)} "
                       "(define more in gin with policies.extra)")
    cfg = sampling.SamplingConfig(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p)
    run = load_run(args.workdir)
    sampler = sampling.Sampler(run.model_cfg, run.params, run.vocab, known[args.policy],
                               run.mesh, cfg)
    prompt = sampling.make_prompt(args.prompt, run.vocab, known[args.policy],
                                  mode=args.mode, raw=args.raw_prompt)
    samples = sampler.generate([prompt] * args.num_samples, seed=args.seed,
                               use_mask=not args.no_mask)
    print(f"run {args.workdir} (step {run.step}) | policy {args.policy} | "
          f"mask {'off' if args.no_mask else 'on'} | prompt {prompt.text!r}")
    verdicts = collections.Counter()
    for i, s in enumerate(samples):
        verdict = {True: "well-formed", False: "NOT well-formed",
                   None: "truncated at max_new_tokens"}[well_formed(s)]
        verdicts[verdict] += 1
        print(f"--- sample {i} ({verdict}, {len(s.tokens)} tokens, final state "
              f"{s.final_state})")
        print(prompt.text + s.text)
        print(f"    modes: {mode_runs(s.modes)}")
    print(", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())))
    if args.output:
        with open(args.output, "w") as f:
            for s in samples:
                f.write(json.dumps({**dataclasses.asdict(s), "policy": args.policy,
                                    "mask": not args.no_mask,
                                    "well_formed": well_formed(s)}) + "\n")
        print(f"wrote {len(samples)} samples to {args.output}")
