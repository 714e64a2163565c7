"""The gin edge: every name a gin file can bind, registered here and nowhere else.

The library takes plain arguments and never imports gin; the CLI (`main.py`) parses the gin
files, then resolves each command's bindings once (`bindings`) and calls the plain
functions with them. A gin file that needs these names (every file in gin/ does) starts
with `import prealign_jax.configurables`, so it also parses from a notebook:

    gin.parse_config_files_and_bindings(["gin/runs/cpu_demo.gin"], [])
    kwargs = configurables.bindings("train")     # {'model': ModelConfig(...), ...}
    train.train(workdir, **kwargs)

Names (T5X style, `NAME.param = value`): `ModelConfig`, `MeshConfig`, `OptimizerConfig`,
`Accelerator` (plan), `Policy` and `policies.extra` (more policies), `generator.Mix`,
`prepare`, `synthesize` and `TeacherConfig` (how hard to push the teacher), `tasks.register` (the seqio Mixture), `seqio_data` (the trainer's data),
`train`, `evaluate`, `experiment`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import gin

from prealign_jax import evaluation, experiment, model, modes, partitioning, plan, tasks
from prealign_jax import train
from prealign_jax.data import feed, generator, prepare, synthesize, teacher
from prealign_jax.errors import UserError


def policies(extra: Sequence[modes.Policy] = ()) -> Sequence[modes.Policy]:
    """`policies.extra = [@my/Policy()]`: policies added to the registry (`modes`)."""
    return tuple(extra)


# name -> (the plain function or class, gin module, parameters the command passes itself:
# binding one is a parse error, not a clash at call time)
REGISTERED: dict[str, tuple[Callable, str | None, tuple[str, ...]]] = {
    "ModelConfig": (model.ModelConfig, None, ()),
    "MeshConfig": (partitioning.MeshConfig, None, ()),
    "OptimizerConfig": (train.OptimizerConfig, None, ()),
    "Accelerator": (plan.Accelerator, None, ()),
    "Policy": (modes.Policy, None, ()),
    "policies": (policies, None, ()),
    "Mix": (generator.Mix, "generator", ()),
    "prepare": (prepare.prepare, None, ("workdir", "from_text", "mode", "tagged",
                                        "bad_records", "tokenizer_file", "label_fn",
                                        "runner", "direct_num_workers",
                                        "pipeline_options", "documents", "attack")),
    "synthesize": (synthesize.synthesize, None, ("workdir", "teacher", "passages", "runner",
                                                 "direct_num_workers", "pipeline_options")),
    "TeacherConfig": (teacher.TeacherConfig, None, ("url", "model", "api", "api_key_env",
                                                    "api_key_file", "flags")),
    "register": (tasks.register, "tasks", ("data_dir", "mixture")),
    "seqio_data": (feed.SeqioData, None, ()),
    "train": (train.train, None, ("workdir", "run_files", "initialize_from")),
    "evaluate": (evaluation.evaluate, None, ("run", "output_dir")),
    "experiment": (experiment.experiment, None, ("workdir", "prepare_args", "train_args",
                                                 "register", "evaluate_args")),
}
for _name, (_fn, _module, _denylist) in REGISTERED.items():
    gin.external_configurable(_fn, _name, module=_module, denylist=_denylist)


class ConfigError(UserError):
    """A gin configuration a command cannot run with (names the binding)."""


def bindings(name: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """The parameters of configurable `name` bound in the parsed gin config (references
    resolved: `@ModelConfig()` is a ModelConfig), for calling its plain function. Each of
    `required` that is neither bound nor defaulted is a one-line error."""
    try:
        bound = gin.get_bindings(name)
    except UserError:  # a referenced configurable refused its values (a ValueError too)
        raise
    except ValueError:  # nothing bound to `name`
        bound = {}
    fn = REGISTERED[name.split(".")[-1]][0]
    for param in required:
        default = inspect.signature(fn).parameters[param].default
        if param not in bound and default is inspect.Parameter.empty:
            raise ConfigError(f"{name}.{param} is not bound; bind it in a gin file or with "
                              f"--gin.{name}.{param}=VALUE")
    return dict(bound)


def register_policies() -> None:
    """Add gin's `policies.extra` to the policy registry."""
    for policy in bindings("policies").get("extra", ()):
        modes.register_policy(policy)
