"""`prealign import`: an open Llama checkpoint (a Hugging Face directory) as the starting
point of a prealign run, for continued pretraining of an open base model.

- The tokenizer (`AutoTokenizer`, a fast one) is laid out in the run's ids (`vocab.py`):
  its BOS (the document start) at id 0, EOS at 1, UNK at 2 (each swapped with the token
  that held the id; a new special `<unk>` if it has none), the seven tags as added tokens
  matched in text at new ids (kept where they already are: importing our own export adds
  nothing). A tag string that is an ordinary token of the tokenizer is refused, and so is a
  tokenizer in which some special token can be produced by text (the escaping guarantee).
- The parameters (`hf.params_from_hf`) follow the ids: embedding and output rows permuted
  the same way; a new token's rows are the mean of the original tokens' rows (so it starts
  as an average token, Hewitt's recipe for new vocabulary); when the vocabulary grows past
  the checkpoint's rows it is rounded up to a multiple of `VOCAB_MULTIPLE` (extra rows
  are never in the data, never sampled).
- Written: `<workdir>/checkpoints/0` (parameters alone: `prealign train` starts from them
  with a fresh optimizer at step 0, as T5X's initialize_from), `run.json`, and
  `<data_dir>/tokenizer.json`, the run's vocabulary: `prealign sample`, `serve` and
  `export` work at once, and `prealign prepare --tokenizer` tokenizes a corpus with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

from prealign_jax import checkpointing, hf, modes, train
from prealign_jax import model as model_lib
from prealign_jax import vocab as vocab_lib

VOCAB_MULTIPLE = 128
NEW_UNK = "<unk>"  # the UNK added to a tokenizer that has none
RUN_IDS = (vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID)  # BOS, EOS, UNK go here
ROW_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # [vocab, d_model]


@dataclasses.dataclass
class RunTokenizer:
    """A checkpoint's tokenizer in the run's ids: `tokenizer` (a `tokenizers.Tokenizer`)
    and `source[run id]`, the checkpoint's id of each run id (the checkpoint's size and
    above: a token the import added)."""

    tokenizer: Any
    source: np.ndarray
    num_original: int  # ids the checkpoint's tokenizer had


def run_tokenizer(hf_dir: str) -> RunTokenizer:
    """The tokenizer of `hf_dir` laid out in the run's ids (see the module docstring)."""
    hf.require("transformers", "tokenizers")
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as e:
        raise hf.HFError(f"{hf_dir}: no tokenizer AutoTokenizer can load "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else e!r}); save "
                         "the model's tokenizer with it (save_pretrained)") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise hf.HFError(f"{hf_dir}: {type(tok).__name__} is not a fast (tokenizers) "
                         "tokenizer; save a tokenizer.json with the model")
    spec = json.loads(tok.backend_tokenizer.to_str())
    kind = spec["model"]["type"]
    if kind not in ("BPE", "Unigram"):
        raise hf.HFError(f"{hf_dir}: a {kind} tokenizer; import supports BPE and Unigram "
                         "tokenizers (Llama's)")
    model_ids = (dict(spec["model"]["vocab"]) if kind == "BPE"
                 else {piece: i for i, (piece, _) in enumerate(spec["model"]["vocab"])})
    added = {a["content"]: a for a in spec["added_tokens"]}
    size = 1 + max([*model_ids.values(), *(a["id"] for a in added.values())])
    new = []  # (content, special) of the tokens the import adds, at ids size, size + 1...
    for tag in modes.TAGS:
        if tag in added:  # (an export of ours): kept, matched in text, not special
            added[tag].update(special=False, normalized=False)
        elif tag in model_ids:
            raise hf.HFError(f"{hf_dir}: the tokenizer already has {tag} as an ordinary "
                             f"token (id {model_ids[tag]}); prealign needs each tag as its own "
                             "token: import a checkpoint whose tokenizer lacks it")
        else:
            new.append((tag, False))
    bos, eos, unk = tok.bos_token_id, tok.eos_token_id, tok.unk_token_id
    if bos is None or eos is None or bos == eos:
        raise hf.HFError(f"{hf_dir}: the tokenizer has no BOS distinct from its EOS (bos "
                         f"{tok.bos_token!r}, eos {tok.eos_token!r}); prealign's model starts "
                         "every document with a BOS and ends it with EOS")
    if unk is None:
        if NEW_UNK in model_ids or NEW_UNK in added:
            raise hf.HFError(f"{hf_dir}: the tokenizer has no unk token but an ordinary "
                             f"{NEW_UNK}; set its unk_token in tokenizer_config.json")
        unk = size + len(new)
        new.append((NEW_UNK, True))
    source = list(range(size + len(new)))
    for target, old in zip(RUN_IDS, (bos, eos, unk)):  # swaps: the fewest ids change
        j = source.index(old)
        source[target], source[j] = source[j], source[target]
    run_id = np.argsort(source)  # the checkpoint's id -> the run's
    spec["added_tokens"] += [
        {"id": size + k, "content": content, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": special}
        for k, (content, special) in enumerate(new)]
    for a in spec["added_tokens"]:
        a["id"] = int(run_id[a["id"]])
    if kind == "BPE":
        # Every added token whose id moved into the model's range is put in the model's
        # vocabulary there (tokenizers gives an added token its model id; merges never
        # produce it), so the ids survive serialization.
        vocab = {piece: int(run_id[i]) for piece, i in model_ids.items()}
        vocab.update({a["content"]: a["id"] for a in spec["added_tokens"]
                      if a["id"] < len(model_ids) and a["content"] not in model_ids})
        spec["model"]["vocab"] = vocab
    else:
        pieces = spec["model"]["vocab"]
        if max(source[:len(pieces)]) >= len(pieces):
            raise hf.HFError(f"{hf_dir}: the Unigram tokenizer's BOS/EOS/UNK are not model "
                             "pieces; import supports Unigram tokenizers with them in the "
                             "model (as SentencePiece converts them)")
        spec["model"]["vocab"] = [pieces[source[i]] for i in range(len(pieces))]
        spec["model"]["unk_id"] = int(run_id[spec["model"]["unk_id"]]) \
            if spec["model"].get("unk_id") is not None else None
    from tokenizers import Tokenizer

    laid_out = Tokenizer.from_str(json.dumps(spec))
    laid_out.encode_special_tokens = True
    _check_layout(hf_dir, laid_out, spec, size + len(new))
    hf.mark_run_specials(laid_out)
    return RunTokenizer(laid_out, np.asarray(source), size)


def _check_layout(hf_dir: str, tok, spec: dict, size: int) -> None:
    """Refuse a tokenizer whose ids did not come out as laid out, or in which text can
    produce a special token (a `</s>` in text must stay text)."""
    moved = [a["content"] for a in spec["added_tokens"]
             if tok.token_to_id(a["content"]) != a["id"]]
    if moved or tok.get_vocab_size(with_added_tokens=True) != size:
        raise hf.HFError(f"{hf_dir}: the tokenizer's ids cannot be laid out for prealign "
                         f"({', '.join(moved[:3]) or 'its size changed'}); import a Llama "
                         "tokenizer with BOS/EOS/UNK in its model vocabulary")
    special = {a["id"]: a["content"] for a in spec["added_tokens"] if a["special"]}
    reserved = (set(special) - {vocab_lib.UNK_ID}) | {tok.token_to_id(t) for t in modes.TAGS}
    for content in special.values():  # (UNK: what an unknown character may become)
        hit = set(tok.encode(content, add_special_tokens=False).ids) & reserved
        if hit:
            raise hf.HFError(f"{hf_dir}: the text {content!r} encodes to the special token "
                             f"{tok.id_to_token(min(hit))!r}: untrusted text could produce "
                             "it; import a tokenizer whose special tokens text cannot reach")


def resize_rows(tensors: dict[str, np.ndarray], source: np.ndarray, num_original: int
                ) -> tuple[dict[str, np.ndarray], int]:
    """The checkpoint's embedding and output rows in the run's ids, new tokens' rows the
    mean of the original tokens'; returns them and the model's vocab_size (the checkpoint's,
    or rounded up to `VOCAB_MULTIPLE` when the tokenizer outgrew it)."""
    rows = len(tensors["model.embed_tokens.weight"])
    vocab_size = rows if len(source) <= rows else -(-len(source) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    order = np.concatenate([source, np.arange(len(source), vocab_size)])
    out = dict(tensors)
    for name in ROW_TENSORS:
        if name in tensors:
            old = tensors[name]
            mean = old[:min(num_original, rows)].astype(np.float64).mean(0).astype(old.dtype)
            grown = np.concatenate([old, np.repeat(mean[None], max(0, vocab_size - rows), 0)])
            grown[num_original:len(source)] = mean  # the added tokens (maybe spare rows)
            out[name] = grown[order]
    return out, vocab_size


def check_import_args(hf_dir: str, workdir: str, data_dir: str) -> None:
    """Refuse what `import_checkpoint` would refuse before anything is read or written."""
    if not os.path.isdir(hf_dir):
        raise hf.HFError(f"--hf_dir={hf_dir} is not a directory; point at a Hugging Face "
                         "model directory (save_pretrained output)")
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise hf.HFError(f"--workdir={workdir} already has checkpoints; import into a new "
                         "--workdir")
    for name in (vocab_lib.VOCAB_FILE, vocab_lib.TOKENIZER_FILE):
        if os.path.exists(os.path.join(data_dir, name)):
            raise hf.HFError(f"--data_dir={data_dir} already holds a vocabulary ({name}); "
                             "choose a new data dir")


def import_checkpoint(hf_dir: str, workdir: str, data_dir: str | None = None,
                      scan_layers: bool = True) -> model_lib.ModelConfig:
    """Write the run `workdir` starting from the checkpoint `hf_dir` (see the module
    docstring); the data dir defaults to `<workdir>/data`. Returns the run's ModelConfig.
    What it wrote is removed again if it fails."""
    data_dir = data_dir or os.path.join(workdir, "data")
    check_import_args(hf_dir, workdir, data_dir)
    cfg = hf.model_config_from_hf(hf_dir, scan_layers=scan_layers)
    tokenizer = run_tokenizer(hf_dir)
    tensors, vocab_size = resize_rows(hf.read_safetensors(hf_dir), tokenizer.source,
                                      tokenizer.num_original)
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    params = hf.params_from_hf(tensors, cfg)
    created = [p for p in (os.path.join(workdir, "checkpoints"), data_dir, workdir)
               if not os.path.exists(p)]
    try:
        os.makedirs(data_dir, exist_ok=True)
        ckpt = checkpointing.Checkpoints(workdir, every=1, keep=1)
        try:
            ckpt.save_params(0, params)
        finally:
            ckpt.close()
        _write(os.path.join(data_dir, vocab_lib.TOKENIZER_FILE), tokenizer.tokenizer.to_str())
        _write(os.path.join(workdir, train.RUN_FILE), json.dumps(
            {"model": dataclasses.asdict(cfg), "data_dir": os.path.abspath(data_dir),
             "imported_from": os.path.abspath(hf_dir)}, indent=1))
    except BaseException:
        for path in [os.path.join(data_dir, vocab_lib.TOKENIZER_FILE)] + created:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        raise
    return cfg


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
