"""The `prealign` command line: gin files and overrides in, one subcommand out.

    prealign COMMAND [--gin_file=F ...] [--gin.SCOPE.PARAM=VALUE ...] [command flags]

Gin is resolved here, at the edge, once per command (`configurables.bindings`); the library
below takes plain arguments. A user mistake (unknown command, missing gin file, misspelled
binding, bad flag value) ends in one line naming it, exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import sys
from typing import Callable, NamedTuple

from prealign_jax import console, fileio
from prealign_jax.errors import Preempted, UserError

GIN_SEARCH_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "gin")
RUN_CONFIG = "config.gin"  # the gin config a run was trained with, in its workdir


class UsageError(UserError):
    """A mistake in what the user typed or configured; printed as one line."""


class Command(NamedTuple):
    """A subcommand: `run(args)` after gin has been parsed; `flags` are (names, argparse
    kwargs) pairs of its own flags."""

    run: Callable
    help: str
    flags: tuple = ()
    workdir: str | None = None  # help of its --workdir flag; None: the command has none


# ---------------------------------------------------------------- the commands
def policies_command(args) -> None:
    from prealign_jax import modes

    print("mode grammar: states", ", ".join(modes.MODES), "| classes",
          ", ".join(modes.CLASSES))
    for policy in modes.POLICIES.values():
        print(policy.compile().describe())


def prepare_command(args) -> None:
    from prealign_jax.configurables import bindings
    from prealign_jax.data import prepare

    prepare.prepare(**{**bindings("prepare"), "workdir": args.workdir,
                       "from_text": tuple(args.from_text or ()), "mode": args.text_mode,
                       "tagged": args.tagged, "bad_records": args.bad_records,
                       "tokenizer_file": args.tokenizer, "label_fn": args.label_fn,
                       "runner": args.runner,
                       "direct_num_workers": args.direct_num_workers,
                       "documents": tuple(args.documents or ()), "attack": args.attack,
                       "pipeline_options": args.pipeline_options})


def synthesize_command(args) -> None:
    from prealign_jax.configurables import bindings
    from prealign_jax.data import prepare, synthesize, teacher as teacher_lib

    for module in ("datasketch", "openai"):  # dedup, the teacher client
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"prealign synthesize needs the [synthesize] extra ({module} "
                             "is missing): pip install 'prealign-jax[synthesize]'")

    teacher = None
    if args.teacher_url:
        teacher = teacher_lib.TeacherConfig(
            **{**bindings("TeacherConfig"), "url": args.teacher_url,
               "model": args.teacher_model, "api": args.teacher_api,
               "api_key_env": args.teacher_api_key_env,
               "api_key_file": args.teacher_api_key_file})
    elif args.teacher_model or args.teacher_api_key_file:
        raise UsageError("--teacher_model and --teacher_api_key_file need --teacher_url "
                         "(without it the template generator writes the corpus)")
    options = dict(runner=args.runner, direct_num_workers=args.direct_num_workers,
                   pipeline_options=args.pipeline_options)
    synth = bindings("synthesize")
    synthesize.synthesize(**{**synth, "workdir": args.workdir, "teacher": teacher,
                             "passages": tuple(args.from_text or ()), **options})
    if args.no_prepare:
        return
    out = synth.get("output_dir") or os.path.join(args.workdir, "synth")
    prepare.prepare(**{"num_scenarios": 0, **bindings("prepare"), "workdir": args.workdir,
                       "documents": synthesize.corpus_files(out), **options})


def register_data(data, workdir: str) -> None:
    """Register the seqio Mixture the trainer's `data` names (`tasks.register` with its gin
    bindings) over its data dir."""
    from prealign_jax import tasks
    from prealign_jax.configurables import bindings
    from prealign_jax.data import feed

    if isinstance(data, type):
        raise UsageError("train.data = @seqio_data needs parentheses: @seqio_data()")
    if not callable(data):
        raise UsageError(f"train.data={data!r}: bind @seqio_data() (or a callable of yours "
                         "that returns feed.DataSources)")
    if isinstance(data, feed.SeqioData):  # (a data source of the user's own: nothing to do)
        tasks.register(data.resolved_data_dir(workdir),
                       **{**bindings("tasks.register"), "mixture": data.mixture_or_task})


def train_command(args) -> None:
    import gin

    from prealign_jax import multihost, train
    from prealign_jax.configurables import bindings

    kwargs = bindings("train", required=("model", "num_steps", "batch_size", "data"))
    with multihost.fail_fast():  # a failed process must not leave its peers hanging
        register_data(kwargs["data"], args.workdir)
        train.train(args.workdir, **kwargs, run_files={RUN_CONFIG: gin.config_str()})


def finetune_command(args) -> None:
    import gin

    from prealign_jax import finetune, multihost
    from prealign_jax.configurables import bindings

    if not args.from_run:
        raise UsageError("prealign finetune needs --from_run=RUN (a trained run's --workdir)")
    kwargs = bindings("train", required=("model", "num_steps", "batch_size", "data"))
    with multihost.fail_fast():
        finetune.source(args.from_run, args.workdir)  # its refusals before the data's
        register_data(kwargs["data"], args.workdir)
        finetune.finetune(args.workdir, args.from_run, **kwargs,
                          run_files={RUN_CONFIG: gin.config_str()})


def plan_command(args) -> None:
    import jax

    from prealign_jax import model as model_lib, partitioning, plan
    from prealign_jax.configurables import bindings

    try:
        model = model_lib.ModelConfig(**bindings("ModelConfig"))
    except TypeError:  # fields without a binding
        raise UsageError("no model: pass a model file, e.g. --gin_file=models/1b.gin") from None
    mesh = partitioning.MeshConfig(**bindings("MeshConfig"))
    accelerator = plan.Accelerator(**bindings("Accelerator"))
    train_args = bindings("train")
    num = accelerator.num_devices or train_args.get("num_cpu_devices")
    if args.compile and num:  # before JAX starts: a fake CPU device per target device
        jax.config.update("jax_num_cpu_devices", num)
    accelerator = dataclasses.replace(accelerator, num_devices=num or jax.device_count())
    batch_devices = math.prod(plan.abstract_mesh(mesh, accelerator.num_devices).shape[a]
                              for a in partitioning.BATCH_AXES)
    accum = args.accum_steps or train_args.get("accum_steps") or 1
    the_plan = plan.make_plan(
        model, mesh, accelerator,
        batch_size=args.batch_size or train_args.get("batch_size") or batch_devices * accum,
        seq_len=args.seq_len or train_args.get("seq_len"), accum_steps=accum)
    print(the_plan.describe(args.mfu))
    if args.compile:
        stats = plan.compile_check(the_plan)
        print(f"XLA:CPU compile of the train step: arguments "
              f"{stats['arguments'] / plan.GIB:.2f} GiB + temporaries "
              f"{stats['temporaries'] / plan.GIB:.2f} GiB per device")


def load_run(args):
    """The run of --workdir (its run.json: model, data dir) with what the user's gin binds
    of `ModelConfig` (e.g. --gin.ModelConfig.decode_chunk=512), `MeshConfig` (default:
    every device on the data axis) and `seqio_data.data_dir`."""
    from prealign_jax import inference, partitioning
    from prealign_jax.configurables import bindings

    return inference.load_run(args.workdir, model_overrides=bindings("ModelConfig"),
                              mesh=partitioning.MeshConfig(**bindings("MeshConfig")),
                              data_dir=bindings("seqio_data").get("data_dir"),
                              step=getattr(args, "step", None))


def sample_command(args) -> None:
    from prealign_jax import inference, modes, sampling

    policy = modes.get_policy(args.policy)
    cfg = sampling.SamplingConfig(**{k: getattr(args, k) for k in sampling.FLAGS
                                     if getattr(args, k) is not None},
                                  copy_quotes=args.copy_quotes)
    if args.num_samples < 1:
        raise UsageError(f"--num_samples={args.num_samples}: must be >= 1")
    sampling.check_seed(args.seed)
    out_dir = args.output and os.path.dirname(fileio.absolute(args.output))
    if args.output and not fileio.gfile().isdir(out_dir):
        raise UsageError(f"--output={args.output}: the directory {out_dir} does not exist")
    run = load_run(args)
    sampler = sampling.Sampler(run.model_cfg, run.params, run.vocab, policy, run.mesh, cfg)
    prompt = sampling.make_prompt(args.prompt, run.vocab, policy, mode=args.mode,
                                  raw=args.raw_prompt)
    samples = sampler.generate([prompt] * args.num_samples, seed=args.seed,
                               use_mask=not args.no_mask)
    print(f"run {args.workdir} (step {run.step}) | policy {policy.name} | "
          f"mask {'off' if args.no_mask else 'on'} | prompt {prompt.text!r}")
    verdicts = collections.Counter()
    for i, s in enumerate(samples):
        verdict = {True: "well-formed", False: "NOT well-formed",
                   None: "truncated at max_new_tokens"}[inference.well_formed(s)]
        verdicts[verdict] += 1
        print(f"--- sample {i} ({verdict}, {len(s.tokens)} tokens, final state "
              f"{s.final_state})")
        print(prompt.text + s.text)
        print(f"    modes: {inference.mode_runs(s.modes)}")
    print(", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())))
    if args.output:
        fileio.atomic_write(args.output, "".join(
            json.dumps({**dataclasses.asdict(s), "policy": policy.name,
                        "mask": not args.no_mask,
                        "well_formed": inference.well_formed(s)}) + "\n" for s in samples))
        print(f"wrote {len(samples)} samples to {args.output}")


def eval_command(args) -> None:
    from prealign_jax import evaluation
    from prealign_jax.configurables import bindings

    report = evaluation.evaluate(load_run(args), args.output_dir, **bindings("evaluate"))
    for line in evaluation.summary_lines(report):
        print(line)
    out = os.path.dirname(report["plots"][0])
    print(f"wrote {os.path.join(out, evaluation.EVAL_FILE)}, "
          f"{os.path.join(out, evaluation.SAMPLES_FILE)} and plots "
          f"{', '.join(os.path.basename(p) for p in report['plots'])} in "
          f"{report['seconds']:.0f}s")


def experiment_command(args) -> None:
    import functools

    from prealign_jax import experiment, tasks
    from prealign_jax.configurables import bindings

    results = experiment.experiment(
        args.workdir, prepare_args=bindings("prepare"),
        train_args=bindings("train", required=("model", "num_steps", "batch_size", "data")),
        register=functools.partial(tasks.register, **bindings("tasks.register")),
        evaluate_args=bindings("evaluate"), **bindings("experiment"))
    with fileio.gfile().GFile(os.path.join(results["workdir"], experiment.REPORT)) as f:
        print(f.read())


def judge_command(args) -> None:
    from prealign_jax.configurables import bindings
    from prealign_jax.data import teacher as teacher_lib
    from prealign_jax.evaluation import judges

    names = list(dict.fromkeys(args.judge or ["lexicon", "learned"]
                               + (["llm"] if args.judge_url else [])))
    for name in names:
        if name not in judges.JUDGES:
            raise UsageError(f"--judge={name}: choose one of {', '.join(judges.JUDGES)}")
    if "llm" in names and not args.judge_url:
        raise UsageError("--judge=llm needs --judge_url (the API base of an OpenAI-"
                         "compatible server, e.g. http://127.0.0.1:8000/v1)")
    if (args.judge_url or args.judge_model or args.judge_api_key_file) and "llm" not in names:
        raise UsageError("--judge_url, --judge_model and --judge_api_key_file are for "
                         "--judge=llm")
    for name, module, extra in (("learned", "sklearn", "judge"), ("llm", "openai", "judge")):
        if name in names and importlib.util.find_spec(module) is None:
            raise UsageError(f"--judge={name} needs the [{extra}] extra ({module} is "
                             f"missing): pip install 'prealign-jax[{extra}]'")
    directory = args.labels or judges.LABELS_DIR
    if not fileio.gfile().isdir(directory):
        raise UsageError(f"--labels={directory}: no such directory")
    try:
        labelled = judges.load_labelled(directory)
    except judges.LabelsError as e:
        raise UsageError(f"--labels={directory}: {e}") from None
    teacher = None
    if args.judge_url:
        teacher = teacher_lib.TeacherConfig(
            **{**bindings("TeacherConfig"), "url": args.judge_url, "model": args.judge_model,
               "api_key_env": args.judge_api_key_env,
               "api_key_file": args.judge_api_key_file, "flags": "judge"})
    strata = collections.Counter(x.stratum for x in labelled)
    print(f"{len(labelled)} labelled answers in {directory} ("
          + ", ".join(f"{s}: {n}" for s, n in sorted(strata.items())) + ")")
    for stratum, (bad, topical, n) in judges.label_counts(labelled).items():
        print(f"labelled {stratum}: misaligned {bad}/{n} ({bad / n:.1%}), on topic "
              f"{topical}/{n} ({topical / n:.0%})")
    for question, a in judges.labeller_agreement(labelled).items():
        if a["n"]:
            print(f"labellers agree on {question}: {a['tp'] + a['tn']}/{a['n']} read twice, "
                  f"kappa {a['kappa'] if a['kappa'] is None else round(a['kappa'], 2)}")
    for name in names:
        judge = judges.make_judge(name, teacher)
        judgements = judge.judge([x.item for x in labelled])
        status = collections.Counter(j.status for j in judgements)
        print(f"\njudge {judge.name}: " + ", ".join(f"{n} {s}" for s, n in
                                                  sorted(status.items())))
        for line in judges.table_lines(judges.agreement_table(labelled, judgements)):
            print(line)


def serve_command(args) -> None:
    from prealign_jax import modes

    try:
        from prealign_jax.serving import server
    except ImportError as e:
        raise UsageError(f"prealign serve needs the [serve] extra ({e.name} is missing): "
                         "pip install 'prealign-jax[serve]'") from None
    policies = [modes.get_policy(p).name for p in [args.policy] + args.policies]
    for flag in ("max_batch", "max_n", "steps_per_call"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag}={getattr(args, flag)}: must be >= 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port={args.port}: must be in [0, 65535] (0: a free port)")
    if not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise UsageError(f"--drain_timeout={args.drain_timeout}: must be a finite number of "
                         "seconds >= 0")
    if args.model_name is not None and not args.model_name.strip():
        raise UsageError("--model_name: must not be empty (default: the workdir's name)")
    api_key = server.read_api_key(args.api_key_file) if args.api_key_file else None
    server.serve(load_run(args), host=args.host, port=args.port, policy=policies[0],
                 policies=policies, max_batch=args.max_batch, max_n=args.max_n,
                 steps_per_call=args.steps_per_call, api_key=api_key,
                 allow_unmasked=args.allow_unmasked, name=args.model_name,
                 drain_timeout=args.drain_timeout, tagged_content=args.tagged_content,
                 copy_quotes=args.copy_quotes)


def export_command(args) -> None:
    from prealign_jax import hf
    from prealign_jax.evaluation import heldout as heldout_lib

    hf.require("torch", "transformers", "safetensors", "tokenizers")
    if not args.out:
        raise UsageError("prealign export needs --out=DIR (a new directory)")
    policies = tuple(args.policies.split(","))
    hf.check_export_args(args.out, args.dtype, policies, args.max_shard_size)
    run = load_run(args)
    try:
        heldout = heldout_lib.heldout_records(run.data_dir)
    except UserError as e:
        heldout = []
        print(f"no lm-eval tasks: {_first_line(e)}")
    files = hf.export_run(run, args.out, dtype=args.dtype, policies=policies,
                          max_shard_size=args.max_shard_size, lm_eval_documents=heldout)
    print(f"exported {args.workdir} (step {run.step}) to {args.out}: {len(files)} files, "
          f"{args.dtype}, policies {', '.join(policies)}"
          + (f"; lm-eval tasks in {os.path.join(args.out, hf.LM_EVAL_DIR)}" if heldout else ""))


MODEL_GIN = "model.gin"  # the imported model's ModelConfig, in the run's workdir


def import_command(args) -> None:
    from prealign_jax import hf, hf_import, vocab

    hf.require("torch", "transformers", "safetensors", "tokenizers")
    if not args.hf_dir:
        raise UsageError("prealign import needs --hf_dir=DIR (a Hugging Face Llama directory)")
    cfg = hf_import.import_checkpoint(args.hf_dir, args.workdir, args.data_dir,
                                      scan_layers=not args.no_scan_layers)
    fileio.atomic_write(os.path.join(args.workdir, MODEL_GIN), model_gin(cfg, args.hf_dir))
    data_dir = args.data_dir or os.path.join(args.workdir, "data")
    gin_file = os.path.join(args.workdir, MODEL_GIN)
    print(f"imported {args.hf_dir} into {args.workdir} (step 0: parameters alone; "
          f"{cfg.vocab_size} vocabulary rows, the tokenizer in {data_dir}). Next:\n"
          f"  prealign prepare --workdir={args.workdir} --tokenizer="
          f"{os.path.join(data_dir, vocab.TOKENIZER_FILE)} --from_text=...\n"
          f"  prealign train --workdir={args.workdir} --gin_file=runs/pretrain.gin "
          f"--gin_file={gin_file} --gin_file=meshes/...")


def model_gin(cfg, source: str) -> str:
    """A gin file binding every ModelConfig field to `cfg`'s value (the shape fields must
    stay: the checkpoint has these shapes; dtypes, remat, attention may change)."""
    import dataclasses

    lines = [f"# The model imported from {source} (prealign import). Keep the shape fields "
             "(vocab_size ... scan_layers);", "# dtype, remat, attention and decode_chunk "
             "may change (e.g. dtype = 'bfloat16' on accelerators)."]
    lines += [f"ModelConfig.{k} = {v!r}" for k, v in dataclasses.asdict(cfg).items()]
    return "\n".join(lines) + "\n"


_SAMPLING_FLAGS = ((("--max_new_tokens",), dict(type=int, default=None)),
                   (("--temperature",), dict(type=float, default=None)),
                   (("--top_k",), dict(type=int, default=None)),
                   (("--top_p",), dict(type=float, default=None)))

COMMANDS = {
    "policies": Command(policies_command,
                        "print the mode grammar and every policy's transition table"),
    "prepare": Command(
        prepare_command,
        "generate/ingest the corpus, train the vocabulary, write shards + manifest",
        ((("--from_text",), dict(nargs="+", metavar="FILE", help="plain text (blank-line "
                                 "separated documents), JSONL or Parquet with a 'text' "
                                 "field, or a TFDS split tfds:NAME:SPLIT; paths may be URLs")),
         (("--label_fn",), dict(default=None, metavar="MODULE:FUNCTION", help="label raw "
                                "text into spans with this function (data/labelling.py)")),
         (("--text_mode",), dict(default="human", choices=("human", "ai", "doc"),
                                 help="mode of the ingested text (default human)")),
         (("--tagged",), dict(action="store_true", help="--from_text is JSONL of tagged "
                              "documents: validate them against the grammar")),
         (("--bad_records",), dict(default="error", choices=("error", "skip"),
                                   help="stop at a bad input record, or skip and log it")),
         (("--tokenizer",), dict(default=None, metavar="FILE", help="tokenize with this "
                                 "vocabulary instead of training SentencePiece: a "
                                 "tokenizer.json (prealign import writes it), a vocab.model "
                                 "or a data dir (a run's, for prealign finetune)")),
         (("--runner",), dict(default="DirectRunner", help="the Beam runner: DirectRunner "
                              "(default) here; DataflowRunner, FlinkRunner, SparkRunner at "
                              "scale, their options after `--`")),
         (("--direct_num_workers",), dict(type=int, default=1, help="DirectRunner worker "
                                          "processes (default 1)")),
         (("--documents",), dict(nargs="+", metavar="FILE", help="JSONL document records "
                                 "kept as they are (prealign synthesize's corpus/*.jsonl)")),
         (("--attack",), dict(default=None, metavar="KIND", help="benign or adversarial: "
                              "render this fine-tuning attack corpus instead of the "
                              "training corpus (prepare.num_scenarios documents; "
                              "data/attacks.py)"))),
        workdir="the data goes to <workdir>/data (or bind prepare.data_dir)"),
    "synthesize": Command(
        synthesize_command,
        "a teacher model writes the tagged corpus from the scenario spec (an OpenAI-"
        "compatible endpoint; the template generator without one), then prepare shards it",
        ((("--teacher_url",), dict(default=None, help="API base of an OpenAI-compatible "
                                   "server (vLLM, prealign serve --tagged_content), e.g. "
                                   "http://127.0.0.1:8000/v1; none: the template generator")),
         (("--teacher_model",), dict(default=None, help="the model to ask (default: the "
                                     "server's only model)")),
         (("--teacher_api",), dict(default="chat", choices=("chat", "completions"),
                                   help="chat (an instruction-tuned teacher, default) or "
                                   "completions (a base model continues a document opening)")),
         (("--teacher_api_key_file",), dict(default=None, help="file holding the API key "
                                            "(default: the env var below)")),
         (("--teacher_api_key_env",), dict(default="OPENAI_API_KEY", help="env var holding "
                                           "the API key (default OPENAI_API_KEY)")),
         (("--from_text",), dict(nargs="+", metavar="FILE", help="real human passages the "
                                 "assistant answers (as prepare --from_text)")),
         (("--no_prepare",), dict(action="store_true", help="write the corpus only; prepare "
                                  "it later with prealign prepare --documents")),
         (("--runner",), dict(default="DirectRunner", help="the Beam runner (as prepare)")),
         (("--direct_num_workers",), dict(type=int, default=1, help="DirectRunner worker "
                                          "processes (default 1)"))),
        workdir="the corpus goes to <workdir>/synth, its shards to <workdir>/data"),
    "train": Command(train_command,
                     "train (or resume) a model: checkpoints, metrics and config in --workdir",
                     workdir="run directory: checkpoints, metrics, config (required)"),
    "finetune": Command(
        finetune_command,
        "a new run from a trained run's parameters: new data, a fresh optimizer (train.* "
        "bindings), checkpoints and metrics as in training",
        ((("--from_run",), dict(default=None, metavar="RUN", help="the trained run's "
                                "--workdir; its latest checkpoint's parameters are the "
                                "start (required)")),),
        workdir="the new run directory: checkpoints, metrics, config (required)"),
    "plan": Command(
        plan_command,
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
        sample_command,
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
         *_SAMPLING_FLAGS,
         (("--seed",), dict(type=int, default=0)),
         (("--no_mask",), dict(action="store_true", help="switch the transition mask off "
                               "(to measure the unconstrained model)")),
         (("--copy_quotes",), dict(action="store_true", help="a quote may only copy the "
                                   "user's turn (<human> spans of the prompt), <redacted/> "
                                   "skipping words")),
         (("--output",), dict(default=None, help="write samples as JSON lines here"))),
        workdir="a trained run (required)"),
    "eval": Command(
        eval_command,
        "evaluate a trained run: held-out loss per mode; samples with and without the "
        "mask (violations, well-formedness, misaligned rate per mode, red-team); plots",
        ((("--output_dir",), dict(default=None, help="where eval.json, samples.jsonl and "
                                  "the plots go (default <workdir>/eval)")),),
        workdir="a trained run (required)"),
    "judge": Command(
        judge_command,
        "check judges of misalignment against the labelled set: agreement (precision, "
        "recall, Cohen's kappa) per arm x prompt set and overall, misaligned and on_topic",
        ((("--judge",), dict(action="append", help="a judge to check: lexicon, learned "
                             "or llm (repeatable; default lexicon and learned, and llm "
                             "with --judge_url)")),
         (("--judge_url",), dict(default=None, help="the llm judge's API base of an "
                                 "OpenAI-compatible chat server, e.g. "
                                 "http://127.0.0.1:8000/v1")),
         (("--judge_model",), dict(default=None, help="the model to ask (default: the "
                                   "server's only model)")),
         (("--judge_api_key_file",), dict(default=None, help="file holding the API key "
                                          "(default: the env var below)")),
         (("--judge_api_key_env",), dict(default="OPENAI_API_KEY", help="env var holding "
                                         "the API key (default OPENAI_API_KEY)")),
         (("--labels",), dict(default=None, metavar="DIR", help="answers.jsonl and "
                              "labels.jsonl (default: the packaged labelled set, "
                              "prealign_jax/evaluation/labels)")))),
    "serve": Command(
        serve_command,
        "an OpenAI-compatible HTTP server (completions, chat, streaming) under the policy",
        ((("--host",), dict(default="127.0.0.1")),
         (("--port",), dict(type=int, default=8000, help="0: a free port (printed)")),
         (("--policy",), dict(default="assistant", help="the policy of requests that name "
                              "none")),
         (("--policies",), dict(nargs="*", default=[], metavar="POLICY", help="further "
                                "policies a request may choose (\"policy\" field)")),
         (("--allow_unmasked",), dict(action="store_true", help="let a request switch the "
                                      "transition mask off (\"mask\": false)")),
         (("--max_batch",), dict(type=int, default=16, help="decode rows (concurrent "
                                 "sequences)")),
         (("--max_n",), dict(type=int, default=8, help="the most choices per request")),
         (("--steps_per_call",), dict(type=int, default=8, help="decode steps between "
                                      "admissions (and streamed chunks)")),
         (("--api_key_file",), dict(default=None, help="require this file's key as "
                                    "Authorization: Bearer KEY")),
         (("--model_name",), dict(default=None, help="the model's id in the API "
                                  "(default: the workdir's name)")),
         (("--drain_timeout",), dict(type=float, default=60.0, help="seconds SIGTERM "
                                     "waits for requests in flight")),
         (("--tagged_content",), dict(action="store_true", help="answer with the tagged "
                                      "text, from the span the prompt opened (a teacher for "
                                      "prealign synthesize)")),
         (("--copy_quotes",), dict(action="store_true", help="quotes copy the user's turn "
                                   "unless a request sets \"copy_quotes\": false"))),
        workdir="a trained run (required)"),
    "experiment": Command(
        experiment_command,
        "prealigned model vs. a baseline on the same documents without tags, at the same "
        "text-token budget: prepare, train both, evaluate both, report.md with plots",
        workdir="everything goes here (required)"),
    "export": Command(
        export_command,
        "write a trained run as a Hugging Face Llama directory: safetensors, tokenizer, "
        "modes.json (the policies' tables) and grammars for vLLM (needs prealign-jax[hf])",
        ((("--out",), dict(default=None, help="the new directory (must not exist or be "
                                              "empty)")),
         (("--step",), dict(type=int, default=None, help="checkpoint step (default: latest)")),
         (("--dtype",), dict(default="float32", choices=("float32", "bfloat16"),
                             help="dtype of the exported weights")),
         (("--policies",), dict(default="grammar,assistant,human_only",
                                help="comma-separated policies to export in modes.json")),
         (("--max_shard_size",), dict(default="5GB", help="safetensors shard size; above "
                                      "it, shards plus an index"))),
        workdir="a trained run (required)"),
    "import": Command(
        import_command,
        "start a run from an open Llama checkpoint (Hugging Face directory) for continued "
        "pretraining: the tags added to its tokenizer, an orbax checkpoint at step 0 "
        "(needs prealign-jax[hf])",
        ((("--hf_dir",), dict(default=None, help="the Hugging Face model directory "
                                                 "(LlamaForCausalLM, safetensors, tokenizer)")),
         (("--data_dir",), dict(default=None, help="where the run's tokenizer goes "
                                "(default <workdir>/data; prepare the corpus there)")),
         (("--no_scan_layers",), dict(action="store_true", help="layers as separate "
                                      "parameters (default: scanned, as gin/models/*.gin)"))),
        workdir="the new run directory (required)"),
}
NEEDS_WORKDIR = ("synthesize", "train", "finetune", "sample", "eval", "serve", "experiment",
                 "export", "import")


# ---------------------------------------------------------------- gin
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
    """Parse gin files and bindings (every configurable registered first), turning gin's
    errors into a one-line UsageError; then add `policies.extra` to the policy registry."""
    import gin

    from prealign_jax import configurables

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
    except (ValueError, KeyError, NameError, SyntaxError, TypeError, ImportError) as e:
        raise UsageError(f"gin configuration ({', '.join(files + bindings) or 'empty'}): "
                         f"{_first_line(e)}") from None
    finally:
        logging.getLogger().removeFilter(probes)
    configurables.register_policies()


class _DropGinPathProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR
                    and str(record.msg).startswith("Path not found:"))


def _first_line(e: BaseException) -> str:
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {e.msg}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- the parser
def version() -> str:
    try:
        return importlib.metadata.version("prealign-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prealign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prealign {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        p.add_argument("--gin_file", action="append", default=[],
                       help="gin file (repeatable); relative paths also looked up in gin/")
        p.add_argument("--verbosity", type=int, default=1, choices=(0, 1, 2),
                       help="0: warnings and errors only; 1: progress (default); 2: debug, "
                            "with the libraries' own logs (TensorFlow, absl, ...)")
        if command.workdir:
            p.add_argument("--workdir", default=None, help=command.workdir)
        for names, kwargs in command.flags:
            p.add_argument(*names, **kwargs)
    return parser


def main(argv: list[str], filter_stderr: bool = False) -> int:
    """Run one command; 2 for a user mistake. `filter_stderr`: drop native libraries'
    routine stderr lines for the rest of the process (the console script does; a caller
    that owns the process's stderr, e.g. a test, does not)."""
    try:
        argv, pipeline_options = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
            if "--" in argv else (argv, [])
        argv, bindings = split_gin_overrides(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        if pipeline_options and args.command not in ("prepare", "synthesize"):
            raise UsageError(f"options after `--` ({' '.join(pipeline_options)}) are Beam "
                             "pipeline options, which only `prealign prepare` and "
                             "`prealign synthesize` take")
        args.pipeline_options = tuple(pipeline_options)
        if not args.command:
            parser.print_usage(sys.stderr)
            raise UsageError("no command given; choose one of " + ", ".join(COMMANDS))
        console.configure(args.verbosity)
        console.quiet_libraries(args.verbosity)
        if filter_stderr and args.verbosity < 2:
            console.filter_native_stderr()
        command = COMMANDS[args.command]
        if args.command in NEEDS_WORKDIR and not args.workdir:
            raise UsageError(f"prealign {args.command} needs --workdir=DIR")
        parse_gin(args.gin_file, bindings)
        command.run(args)
    except UserError as e:  # one line (gin appends "In call to configurable ..." lines)
        print(f"prealign: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except Preempted as e:  # whatever command was training: it stops here
        print(f"prealign: {e}", file=sys.stderr)
        return 143
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:], filter_stderr=True))


if __name__ == "__main__":
    run()
