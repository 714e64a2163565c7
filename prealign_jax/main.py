"""The `prealign` command line: gin files and overrides in, one subcommand out.

    prealign COMMAND [--gin_file=F ...] [--gin.SCOPE.PARAM=VALUE ...] [command flags]

Gin is configured here, at the edge; the library below never reads gin itself except
through the `@gin.configurable` entry points each command names. A user mistake (unknown
command, missing gin file, misspelled binding) ends in one line naming it, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NamedTuple

import gin

from prealign_jax import modes, policy_config
from prealign_jax.errors import UserError


class Command(NamedTuple):
    """A subcommand: `target` is "module:function", called with the parsed flags after gin
    has been parsed; `flags` are (names, argparse kwargs) pairs of its own flags."""

    target: str
    help: str
    flags: tuple = ()
    run_config: bool = False  # parse <workdir>/config.gin (a trained run's) before the user's


COMMANDS = {
    "policies": Command("prealign_jax.main:show_policies",
                        "print the mode grammar and every policy's transition table"),
    "prepare": Command(
        "prealign_jax.data.prepare:main",
        "generate/ingest the corpus, train the vocabulary, write shards + manifest",
        ((("--from_text",), dict(nargs="+", metavar="FILE", help="plain text (blank-line "
                                 "separated documents) or JSONL with a 'text' field")),
         (("--mode",), dict(default="human", choices=("human", "ai", "doc"),
                            help="mode of ingested text")),
         (("--tagged",), dict(action="store_true", help="--from_text is JSONL of tagged "
                              "documents: validate them against the grammar")),
         (("--bad_records",), dict(default="error", choices=("error", "skip"),
                                   help="stop at a bad input record, or skip and log it")))),
    "train": Command("prealign_jax.train:command",
                     "train (or resume) a model: checkpoints, metrics and config in --workdir"),
    "plan": Command(
        "prealign_jax.plan:command",
        "per-device memory, FLOPs and step time of a model on a mesh (no accelerator needed)",
        ((("--batch_size",), dict(type=int, default=None, help="global sequences per step "
                                  "(default: train.batch_size if bound, else one per device)")),
         (("--seq_len",), dict(type=int, default=None, help="default: train.seq_len or "
                               "ModelConfig.max_len")),
         (("--accum_steps",), dict(type=int, default=None, help="default: train.accum_steps")),
         (("--mfu",), dict(type=float, default=0.5, help="model FLOPs utilisation for the "
                           "step time (default 0.5)")),
         (("--compile",), dict(action="store_true", help="also compile the train step for "
                               "the mesh on fake CPU devices and print XLA's buffer sizes")))),
    "sample": Command(
        "prealign_jax.inference:command",
        "sample from a trained run under a policy (the transition mask)",
        ((("--policy",), dict(default="assistant", help="policy name (built-in or defined "
                                                        "in gin with policies.extra)")),
         (("--mode",), dict(default=None, choices=("human", "ai"),
                            help="open this span after the prompt (as a chat template does); "
                                 "ai puts the prompt in the user's turn <human>...</human>")),
         (("--prompt",), dict(default="", help="user text (escaped: it cannot inject tags)")),
         (("--raw_prompt",), dict(action="store_true", help="--prompt is tagged text, "
                                  "validated against the policy")),
         (("--num_samples",), dict(type=int, default=4)),
         (("--max_new_tokens",), dict(type=int, default=128)),
         (("--temperature",), dict(type=float, default=0.7)),
         (("--top_k",), dict(type=int, default=0)),
         (("--top_p",), dict(type=float, default=0.9)),
         (("--seed",), dict(type=int, default=0)),
         (("--no_mask",), dict(action="store_true", help="switch the transition mask off "
                               "(to measure the unconstrained model)")),
         (("--output",), dict(default=None, help="write samples as JSON lines here"))),
        run_config=True),
    "eval": Command(
        "prealign_jax.evaluation:command",
        "evaluate a trained run: held-out loss per mode; samples with and without the "
        "mask (violations, well-formedness, misaligned rate per mode, red-team); plots",
        ((("--output_dir",), dict(default=None, help="where eval.json, samples.jsonl and "
                                  "the plots go (default <workdir>/eval)")),),
        run_config=True),
    "experiment": Command(
        "prealign_jax.experiment:command",
        "prealigned model vs. a baseline on the same documents without tags, at the same "
        "text-token budget: prepare, train both, evaluate both, report.md with plots"),
}

GIN_SEARCH_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "gin")


class UsageError(UserError):
    """A mistake in what the user typed or configured; printed as one line."""


def split_gin_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--gin.X=Y` overrides (T5X style) from ordinary flags."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            binding = arg[len("--gin."):]
            if "=" not in binding:
                raise UsageError(f"{arg}: a gin override needs a value, e.g. "
                                 "--gin.train.num_steps=100")
            bindings.append(binding)
        else:
            rest.append(arg)
    return rest, bindings


def parse_gin(files: list[str], bindings: list[str], search_paths=(GIN_SEARCH_PATH,)) -> None:
    """Parse gin files and bindings, turning gin's errors into a one-line UsageError."""
    for path in search_paths:
        gin.add_config_file_search_path(path)
    resolved = []
    for f in files:
        candidates = [f] + [os.path.join(p, f) for p in search_paths]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise UsageError(f"--gin_file={f}: no such file (looked in . and "
                             f"{', '.join(search_paths)})")
        resolved.append(found)
    # gin probes every `include` as a Python package path before its search path and logs
    # an ERROR for each miss, although the file is then found in gin/: drop those lines.
    probes = _DropGinPathProbes()
    logging.getLogger().addFilter(probes)
    gin.clear_config()  # each invocation starts from its own files and bindings
    try:
        # finalize: a `%gin.REQUIRED` binding nobody overrode is an error here
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=True)
    except (ValueError, KeyError, NameError, SyntaxError) as e:
        raise UsageError(f"gin configuration ({', '.join(files + bindings) or 'empty'}): "
                         f"{_first_line(e)}") from None
    finally:
        logging.getLogger().removeFilter(probes)


class _DropGinPathProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR
                    and str(record.msg).startswith("Path not found:"))


def _first_line(e: BaseException) -> str:
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {e.msg}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def show_policies(args) -> None:
    print("mode grammar: states", ", ".join(modes.MODES), "| classes",
          ", ".join(modes.CLASSES))
    for policy in policy_config.policies().values():
        print(policy.compile().describe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prealign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        p.add_argument("--gin_file", action="append", default=[],
                       help="gin file (repeatable); relative paths also looked up in gin/")
        p.add_argument("--workdir", default=None, help="run directory")
        for names, kwargs in command.flags:
            p.add_argument(*names, **kwargs)
    return parser


def main(argv: list[str]) -> int:
    try:
        argv, bindings = split_gin_overrides(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        module, fn = COMMANDS[args.command].target.split(":")
        target = getattr(importlib.import_module(module), fn)  # registers its configurables
        files = args.gin_file
        if COMMANDS[args.command].run_config and args.workdir:
            run_config = os.path.join(args.workdir, "config.gin")
            if not os.path.isfile(run_config):
                raise UsageError(f"--workdir={args.workdir}: no config.gin; is it a run "
                                 "directory written by prealign train?")
            files = [run_config] + files
        parse_gin(files, bindings)
        args.gin_bindings = bindings  # for commands that run stages under their own gin
        target(args)
    except UserError as e:  # one line (gin appends "In call to configurable ..." lines)
        print(f"prealign: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a gin.REQUIRED parameter left unbound
        if not str(e).startswith("Required bindings"):
            raise
        print(f"prealign: error: {_first_line(e)}; bind them in a gin file or with "
              "--gin.NAME=VALUE", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
