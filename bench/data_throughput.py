"""Data plane throughput; prints one JSON object.

    python bench/data_throughput.py [--scenarios 200000] [--data_dir D]

- prepare: `prealign prepare`'s Beam pipeline on the DirectRunner, documents per second of
  the pipeline run (the manifest's figure: from reading the sources to the committed
  shards, the vocabulary's training before it excluded) in the driver process
  (in_memory_1, the default for 1 worker) and in 1 and 2 worker processes
  (multi_processing, which pays each worker's start-up and moves elements between
  processes), and the speedups of 2 workers; the corpus is the CPU demo's configuration
  (gin/data/cpu_demo.gin) with --scenarios;
- packed_tokens_per_s: the training pipeline over the pre-tokenized shards, through the
  seqio Mixture: cached shards -> conditional-token converter -> packed batches
  (non-padding tokens per second, median of --repeats rounds that alternate with the plain
  pipeline's);
- plain_seqio_tokens_per_s: plain seqio over the same text and vocabulary, same run:
  TextLine -> tokenize -> LMFeatureConverter(pack=True), for reference;
- demo_consumption_ratio: packed_tokens_per_s / the CPU demo's training tokens/s
  (--train_tokens_per_s, default 20000: an assumed figure, not measured here).

Without --data_dir the reading benchmarks use the in_memory_1 prepare's data dir.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rates(pipelines: dict, batches: int, repeats: int, warmup: int) -> dict:
    """Median non-padding tokens/s of each pipeline over `repeats` rounds.

    Each round runs every pipeline alone: a fresh iterator, `warmup` batches (tracing,
    shuffle buffers, autotuning), then `batches` timed batches, then the iterator is
    dropped so its background threads stop. Rounds alternate, so load from other jobs on
    the machine hits all pipelines alike.
    """
    measured = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, make in pipelines.items():
            it = make()
            for _ in range(warmup):
                next(it)
            start, tokens = time.perf_counter(), 0
            for _ in range(batches):
                tokens += int((next(it)["decoder_segment_ids"] > 0).sum())
            measured[name].append(tokens / (time.perf_counter() - start))
            del it
            gc.collect()
    return {name: statistics.median(r) for name, r in measured.items()}


def numpy_batches(ds):
    for batch in ds:
        yield {k: v.numpy() for k, v in batch.items()}


def plain_seqio_dataset(data_dir: str, text_dir: str, batch_size: int, length: int, seed: int):
    """The stock seqio pipeline over the same documents (newlines become spaces)."""
    import seqio

    from prealign_jax import vocab as vocab_lib
    from prealign_jax.data import shards

    manifest = shards.read_manifest(data_dir)
    files = []
    for s in manifest["shards"]:
        if s["split"] != "train":
            continue
        path = os.path.join(text_dir, s["file"].replace("/", "_") + ".txt")
        with open(path, "w", encoding="utf-8") as f:
            for doc in shards.iter_documents([os.path.join(data_dir, s["file"])]):
                f.write(doc.text.replace("\n", " ") + "\n")
        files.append(path)
    vocab = vocab_lib.load_dir(data_dir)
    name = "bench_plain_textline"
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource({"train": files}),
        preprocessors=[lambda ds: ds.map(lambda line: {"targets": line}),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})
    return seqio.get_dataset(task, {"targets": length}, seqio.LMFeatureConverter(pack=True),
                             shuffle=True, seed=seed, num_epochs=None,
                             batch_size=batch_size, verbose=False)


RUNS = {"in_memory_1": (1, "in_memory"), "multi_processing_1": (1, "multi_processing"),
        "multi_processing_2": (2, "multi_processing")}


def prepare_rates(root: str, scenarios: int) -> dict:
    """Pipeline documents/s of `prealign prepare` per DirectRunner mode and worker count;
    the data dirs stay under `root`."""
    from prealign_jax import main as cli
    from prealign_jax.configurables import bindings
    from prealign_jax.data import prepare, shards

    cli.parse_gin(["data/cpu_demo.gin"], [f"prepare.num_scenarios={scenarios}"])
    out = {}
    for name, (workers, mode) in RUNS.items():
        data_dir = prepare.prepare(**{**bindings("prepare"),
                                      "data_dir": os.path.join(root, name),
                                      "direct_num_workers": workers,
                                      "pipeline_options": [f"--direct_running_mode={mode}"]})
        manifest = shards.read_manifest(data_dir)
        out[name] = {"docs_per_s": manifest["pipeline"]["documents_per_s"],
                     "seconds": manifest["pipeline"]["seconds"],
                     "documents": sum(t["documents"] for t in manifest["totals"].values())}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", help="read this data dir (default: the 1-worker "
                        "prepare's)")
    parser.add_argument("--scenarios", type=int, default=200000,
                        help="synthetic scenarios of each prepare run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=150, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=40, help="untimed batches per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--train_tokens_per_s", type=float, default=20000.0,
                        help="CPU demo training throughput (assumed default 20000 tok/s)")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    from prealign_jax.data import pipeline
    from prealign_jax import tasks

    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_rates(tmp, args.scenarios)
        data_dir = args.data_dir or os.path.join(tmp, "in_memory_1")
        mixture = tasks.register(data_dir)
        ours = pipeline.get_dataset(mixture, "train", args.batch_size, args.length, seed=0)
        plain_ds = plain_seqio_dataset(data_dir, tmp, args.batch_size, args.length, seed=0)
        measured = rates({"ours": lambda: pipeline.DataIterator(ours),
                          "plain": lambda: numpy_batches(plain_ds)},
                         args.batches, args.repeats, args.warmup)
        packed, plain = measured["ours"], measured["plain"]
    rate = {name: r["docs_per_s"] for name, r in prepared.items()}
    print(json.dumps({
        "prepare": prepared,
        "prepare_2_workers_vs_1": round(rate["multi_processing_2"]
                                        / rate["multi_processing_1"], 3),
        "prepare_2_workers_vs_in_memory": round(rate["multi_processing_2"]
                                                / rate["in_memory_1"], 3),
        "packed_tokens_per_s": round(packed),
        "plain_seqio_tokens_per_s": round(plain),
        "packed_vs_plain": round(packed / plain, 3),
        "demo_consumption_ratio": round(packed / args.train_tokens_per_s, 1),
        "train_tokens_per_s_assumed": args.train_tokens_per_s,
        "scenarios": args.scenarios, "batch_size": args.batch_size, "length": args.length,
        "cpu_count": os.cpu_count(), "tf_version": tf.__version__,
    }))


if __name__ == "__main__":
    main()
