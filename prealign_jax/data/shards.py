"""TFRecord shards of tokenized documents and the `manifest.json` that describes them.

Layout of a data dir (`prealign prepare` writes it; see `beam_pipeline.py`):

    manifest.json                        the commit point: shards, counts, checksums, the
                                         vocabulary, the config and its hash, the report
    build-<hash>-<time>/vocab.model      the SentencePiece vocabulary (or tokenizer.json)
    build-<hash>-<time>/<source>/<split>.tfrecord-00000-of-00008   seqio's cache layout,
    build-<hash>-<time>/<source>/{info,stats}.<split>.json         and its files

A build is written in its own directory, which no reader opens until the manifest naming it
is written (last, by rename): nothing half-written is ever read, on local disk or an object
store. Readers take the file list from the manifest, never from a glob. A data dir may be a
URL (`gs://...`): every file here is read and written through `fileio`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Iterable, Sequence

from prealign_jax import fileio, tf_cpu
from prealign_jax.data import records
from prealign_jax.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardError(UserError):
    """A missing, truncated or corrupt shard or manifest (names the file and the fix)."""


def write_records(path: str, examples: Sequence[bytes]) -> None:
    """A TFRecord file of serialized examples (any URL `tf.io.gfile` knows)."""
    tf = tf_cpu.import_tf()
    fileio.gfile().makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example)


def file_facts(path: str) -> dict:
    """The `bytes` and `sha256` a manifest records of a file."""
    h = hashlib.sha256()
    with fileio.gfile().GFile(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": fileio.gfile().stat(path).length, "sha256": h.hexdigest()}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with fileio.gfile().GFile(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(data_dir: str, manifest: dict) -> None:
    fileio.atomic_write(os.path.join(data_dir, MANIFEST), json.dumps(
        {"format": FORMAT_VERSION, **manifest}, indent=1, sort_keys=True) + "\n")


def read_manifest(data_dir: str) -> dict:
    gfile = fileio.gfile()
    path = os.path.join(data_dir, MANIFEST)
    if not gfile.exists(path):
        raise ShardError(f"{path} does not exist: {data_dir} is not a prepared data dir; "
                         "run `prealign prepare` for it")
    try:
        with gfile.GFile(path) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError, tf_cpu.import_tf().errors.OpError) as e:
        raise ShardError(f"{path} is unreadable ({e}); rerun `prealign prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardError(f"{path} has format {found!r}, expected "
                         f"{FORMAT_VERSION}; rerun `prealign prepare`")
    problem = _shard_list_problem(manifest.get("shards"))
    if problem:
        raise ShardError(f"{path} {problem}; rerun `prealign prepare` for {data_dir}")
    return manifest


# What readers take from each manifest entry of a shard.
_ENTRY_FIELDS = {"file": str, "source": str, "split": str, "records": int, "bytes": int,
                 "sha256": str}


def _shard_list_problem(entries) -> str | None:
    """What is wrong with a manifest's shard list, checked up front so that readers never
    meet a KeyError deep inside `register` or a check."""
    if not isinstance(entries, list):
        return "has no shard list ('shards')"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return f"shard entry {i} is not an object"
        for key, kind in _ENTRY_FIELDS.items():
            value = entry.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"shard entry {i} ({entry.get('file')}) has no valid {key!r}"
    return None


def shard_files(data_dir: str, manifest: dict, source: str, split: str) -> list[str]:
    return [os.path.join(data_dir, s["file"]) for s in manifest["shards"]
            if s["source"] == source and s["split"] == split]


def record_counts(data_dir: str, manifest: dict) -> dict[str, int]:
    """Path -> the number of records the manifest says each shard holds."""
    return {os.path.join(data_dir, s["file"]): s["records"] for s in manifest["shards"]}


def complete_records(path: str) -> tuple[int, bool]:
    """(number of complete records, whether an incomplete record follows) of a TFRecord file.

    Reads only the 12-byte record headers: a record is 8 bytes length, 4 bytes length CRC,
    the data and a 4-byte data CRC.
    """
    gfile = fileio.gfile()
    size, count, pos = gfile.stat(path).length, 0, 0
    with gfile.GFile(path, "rb") as f:
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                return count, True
            (length,) = struct.unpack("<Q", header[:8])
            pos += 12 + length + 4
            if pos > size:
                return count, True
            f.seek(pos)
            count += 1
    return count, False


def check_shards(data_dir: str, manifest: dict, checksums: bool = False) -> list[str]:
    """Problems of the shards against the manifest, one message per bad shard (or []).

    Cheap by default (existence and size); `checksums=True` also compares SHA-256.
    """
    gfile, problems = fileio.gfile(), []
    for s in manifest["shards"]:
        path = os.path.join(data_dir, s["file"])
        if not gfile.exists(path):
            problems.append(f"shard {path} is missing")
            continue
        size = gfile.stat(path).length
        if size != s["bytes"]:
            good, partial = complete_records(path)
            what = (f"record {good} is truncated" if partial
                    else f"it holds {good} complete records")
            problems.append(f"shard {path} has {size} bytes, the manifest says {s['bytes']} "
                            f"({s['records']} records): {what}")
        elif checksums and sha256(path) != s["sha256"]:
            problems.append(f"shard {path} does not match its sha256 in the manifest")
    return problems


def iter_documents(paths: Iterable[str]) -> Iterable[records.Document]:
    """Every document of the given shards, in order (tools, evaluation, tests). A record
    that cannot be read or parsed is a ShardError naming the shard and record."""
    from google.protobuf.message import DecodeError

    tf = tf_cpu.import_tf()
    for path in paths:
        index = 0
        try:
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                yield records.from_example(raw)
                index += 1
        except (tf.errors.OpError, DecodeError, ValueError, LookupError) as e:
            what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShardError(f"shard {path} record {index}: unreadable ({what[:120]}); rerun "
                             "`prealign prepare`") from None
