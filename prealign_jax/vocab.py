"""The vocabulary, in which every mode tag is exactly one token: a SentencePiece model
trained by `prealign prepare`, or an open model's tokenizer brought in by `prealign import`.

A prepared data dir holds exactly one of them, and its file name says which: `vocab.model`
(SentencePiece, `load`) or `tokenizer.json` (a Hugging Face `tokenizers` file in the run's
id layout, `TokenizerVocabulary`); `load_dir` reads either, or the one its manifest names
(possibly in a build sub-directory). Paths may be URLs (`fileio`).

Conventions (tested in tests/test_vocab.py; the imported tokenizer keeps the ids, the tag
matching and the escaping guarantee, tests/test_hf_import.py):
- ids: pad=0, eos=1, unk=2 (seqio's layout), no BOS; the seven tags are user-defined
  symbols, so SentencePiece extracts them from any input as single pieces — which is why
  untrusted text must go through `tags.escape` first. Pad, eos and unk are never produced
  by text.
- Whitespace: *no dummy prefix* and *identity normalization*. Text is tokenized verbatim:
  a tag at the start of text is not preceded by a phantom `▁` piece, spaces and newlines
  around a tag belong to the neighbouring text (`" <ai>"` is `▁` + `<ai>`), runs of
  spaces are kept, and `decode(encode(x)) == x` for every tagged text x. The one exception
  is U+2581 itself (SentencePiece's space symbol), which decodes as a space.
- Byte fallback: characters unseen in training become byte pieces, never `unk`.
- Decoding model output (`decode_tagged`) is faithful: only tag *ids* become tags. Text
  pieces that happen to spell a tag (`<`, `ai`, `>`) decode escaped, as `tags.escape`
  writes untrusted text, so `tags.parse` reads back exactly the ids' modes.
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Iterable, Mapping

import numpy as np

from prealign_jax import fileio, modes, tags, tf_cpu
from prealign_jax.errors import UserError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
VOCAB_FILE = "vocab.model"  # a SentencePiece vocabulary's name in a prepared data dir
TOKENIZER_FILE = "tokenizer.json"  # an imported tokenizer's name there (`prealign import`)


class VocabError(UserError):
    """A vocabulary file that is missing or unusable (names the file and the fix)."""


def train(texts: Iterable[str], model_path: str, vocab_size: int,
          model_type: str = "unigram", max_sentence_length: int = 65536) -> str:
    """Train a SentencePiece model on tagged texts and write it to `model_path`.

    Written via a temporary file and a rename, so a crash never leaves a half-written model
    that a later run would load. Returns `model_path`.
    """
    import sentencepiece as spm

    minimum = len(modes.TAGS) + 3 + 256  # tags, pad/eos/unk, byte pieces
    if vocab_size <= minimum:
        raise VocabError(f"vocab_size={vocab_size} is too small: the tags, special ids and "
                         f"byte pieces alone take {minimum}; choose a larger vocab_size")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size,
            model_type=model_type, user_defined_symbols=list(modes.TAGS),
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, character_coverage=0.9995, split_digits=True,
            max_sentence_length=max_sentence_length, hard_vocab_limit=False,
            num_threads=1,  # deterministic: same texts -> same model bytes
            minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the sample's characters need
        raise VocabError(f"vocab_size={vocab_size}: SentencePiece cannot train it ("
                         f"{str(e).split('] ')[-1].splitlines()[0][:160]}); choose a larger "
                         "vocab_size") from None
    fileio.gfile().makedirs(os.path.dirname(fileio.absolute(model_path)))
    fileio.atomic_write(model_path, proto.getvalue())
    return model_path


def load(model_path: str):
    """The model as a `seqio.SentencePieceVocabulary`, after checking our conventions."""
    import sentencepiece as spm

    tf_cpu.import_tf()
    import seqio

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(_read(model_path))
    except (OSError, RuntimeError) as e:
        raise VocabError(f"vocabulary {model_path} is not a SentencePiece model ({e}); "
                         "rebuild it with `prealign prepare`") from None
    user_defined = {p.piece for p in _model_proto(sp).pieces
                    if p.type == p.USER_DEFINED}
    for tag in modes.TAGS:
        if tag not in user_defined or len(sp.encode(tag)) != 1:
            raise VocabError(f"vocabulary {model_path} does not hold {tag} as one "
                             "user-defined symbol; retrain it with prealign_jax.vocab.train")
    if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
        raise VocabError(f"vocabulary {model_path} has pad/eos/unk ids "
                         f"{sp.pad_id(), sp.eos_id(), sp.unk_id()}, expected 0/1/2; retrain it")
    return seqio.SentencePieceVocabulary(model_path)


def load_dir(data_dir: str):
    """The vocabulary of a prepared data dir (the file `find` names)."""
    path = find(data_dir)
    return _tokenizer_vocabulary_class()(path) if path.endswith(".json") else load(path)


def find(data_dir: str) -> str:
    """The vocabulary file of a prepared data dir: the file its manifest names
    (`manifest["vocab"]["file"]`, relative to the data dir, e.g. in a build sub-directory:
    `.model` SentencePiece, `.json` tokenizers); without one, its `vocab.model` or its
    `tokenizer.json`."""
    gfile = fileio.gfile()
    named = _manifest_vocab(data_dir)
    if named is not None:
        if not named.endswith((".model", ".json")):
            raise VocabError(f"{os.path.join(data_dir, 'manifest.json')} names the "
                             f"vocabulary {named!r}, neither a .model (SentencePiece) nor "
                             "a .json (tokenizers) file; rerun `prealign prepare`")
        return os.path.join(data_dir, named)
    found = [name for name in (VOCAB_FILE, TOKENIZER_FILE)
             if gfile.exists(os.path.join(data_dir, name))]
    if len(found) > 1:
        raise VocabError(f"{data_dir} holds both {VOCAB_FILE} and {TOKENIZER_FILE}; a data "
                         "dir has one vocabulary: remove the one its shards were not "
                         "prepared with")
    if not found:
        raise VocabError(f"vocabulary {os.path.join(data_dir, VOCAB_FILE)} does not exist "
                         f"(nor {TOKENIZER_FILE}); build it with `prealign prepare` (or "
                         "`prealign import`) or point the gin binding at the right data dir")
    return os.path.join(data_dir, found[0])


def _manifest_vocab(data_dir: str) -> str | None:
    """The vocabulary file the data dir's manifest.json names, if it names one. Read here,
    not by `data.shards.read_manifest`, so that a vocabulary loads whatever the state of
    the shards (their reader reports that); an unreadable manifest names none."""
    path = os.path.join(data_dir, "manifest.json")
    if not fileio.gfile().exists(path):
        return None
    try:
        named = json.loads(_read(path))["vocab"]["file"]
    except (ValueError, KeyError, TypeError):
        return None
    return named if isinstance(named, str) and named else None


def _read(path: str) -> bytes:
    """The bytes of the vocabulary file `path`, or a VocabError saying it is missing."""
    gfile = fileio.gfile()
    if not gfile.exists(path):
        raise VocabError(f"vocabulary {path} does not exist; build it with "
                         "`prealign prepare` or point the gin binding at the right file")
    with gfile.GFile(path, "rb") as f:
        return f.read()


def __getattr__(name: str):
    # TokenizerVocabulary subclasses seqio's Vocabulary: defined on first use, so importing
    # this module does not import TensorFlow.
    if name == "TokenizerVocabulary":
        return _tokenizer_vocabulary_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _tokenizer_vocabulary_class():
    tf_cpu.import_tf()
    import seqio

    class TokenizerVocabulary(seqio.Vocabulary):
        """A Hugging Face `tokenizers` file as a seqio Vocabulary, for runs started from an
        open model (`prealign import` writes it: pad 0, eos 1, unk 2, the tags as added tokens).

        Encoding never matches a special token (`encode_special_tokens`: a literal `</s>` is
        text) and adds none; the tags, added tokens that are not special, are matched in any
        text as SentencePiece's user-defined symbols are, so `tags.escape`d text never yields a
        tag id. In TensorFlow through `tf.py_function` (the Rust tokenizer, a batch per call)."""

        def __init__(self, path: str):
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise VocabError(f"vocabulary {path} is a Hugging Face tokenizer: pip install "
                                 "'prealign-jax[hf]'") from None
            data = _read(path).decode("utf-8", "replace")
            try:
                self.tokenizer = Tokenizer.from_str(data)
            except Exception as e:  # (the Rust library raises a bare Exception)
                raise VocabError(f"vocabulary {path} is not a tokenizers file ({e}); write it "
                                 "with `prealign import`") from None
            self.tokenizer_file = path
            self.tokenizer.encode_special_tokens = True
            super().__init__()
            added = self.tokenizer.get_added_tokens_decoder()
            for i in (PAD_ID, EOS_ID, UNK_ID):
                if i not in added or not added[i].special:
                    raise VocabError(f"vocabulary {path}: id {i} is not a special token (pad "
                                     "0, eos 1, unk 2); write it with `prealign import`")
            for tag in modes.TAGS:
                i = self.tokenizer.token_to_id(tag)
                if i not in added or added[i].special or self._encode(tag) != [i]:
                    raise VocabError(f"vocabulary {path} does not hold {tag} as one added "
                                     "token matched in text; write it with `prealign import`")

        @property
        def eos_id(self) -> int:
            return EOS_ID

        @property
        def unk_id(self) -> int:
            return UNK_ID

        @property
        def _base_vocab_size(self) -> int:
            return self.tokenizer.get_vocab_size(with_added_tokens=True)

        def _encode(self, s: str) -> list[int]:
            return self.tokenizer.encode(s, add_special_tokens=False).ids

        def _decode(self, ids) -> str:
            return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

        def _encode_tf(self, s):
            """A string -> int32[n]; strings [B] -> a RaggedTensor [B, None]."""
            import tensorflow as tf

            def encode(texts):
                encoded = self.tokenizer.encode_batch(
                    [t.decode("utf-8", "replace") for t in texts.numpy()],
                    add_special_tokens=False)
                lengths = np.array([len(e.ids) for e in encoded], np.int64)
                flat = np.array([i for e in encoded for i in e.ids], np.int32)
                return flat, lengths

            flat, lengths = tf.py_function(encode, [tf.reshape(s, [-1])], [tf.int32, tf.int64])
            flat.set_shape([None])
            lengths.set_shape([None])
            ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)
            return ragged[0] if s.shape.rank == 0 else ragged

        def _decode_tf(self, ids):
            """int ids [..., n] -> strings [...]."""
            import tensorflow as tf

            def decode(rows):
                rows = rows.numpy()
                flat = rows.reshape(-1, rows.shape[-1])
                return np.array([self._decode(r).encode() for r in flat],
                                object).reshape(rows.shape[:-1])

            out = tf.py_function(decode, [ids], tf.string)
            out.set_shape(ids.shape[:-1])
            return out

    return TokenizerVocabulary


def _model_proto(sp):
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())


def tag_ids(vocab) -> dict[str, int]:
    """Id of each tag in a vocabulary (`load`, `load_dir`)."""
    if isinstance(vocab, _tokenizer_vocabulary_class()):
        return {tag: vocab.tokenizer.token_to_id(tag) for tag in modes.TAGS}
    return {tag: vocab.tokenizer.piece_to_id(tag) for tag in modes.TAGS}


def decode_tagged(vocab, ids: Iterable[int], plain: Mapping[str, str] | None = None) -> str:
    """Tagged text of token ids: each tag id as its tag, each maximal run of text ids
    decoded and escaped (`tags.escape`); PAD and EOS dropped. With `plain`, plain text
    instead: text runs as decoded, each tag id as `plain.get(tag, "")`."""
    tag_of = {i: tag for tag, i in tag_ids(vocab).items()}
    out, run = [], []

    def flush():
        if run:
            text = vocab.decode(run)
            out.append(text if plain is not None else tags.escape(text))
            run.clear()

    for i in map(int, ids):
        if i in tag_of:
            flush()
            out.append(tag_of[i] if plain is None else plain.get(tag_of[i], ""))
        elif i not in (PAD_ID, EOS_ID):
            run.append(i)
    flush()
    return "".join(out)


def model_token_classes(token_class: np.ndarray, model_vocab_size: int) -> np.ndarray:
    """`token_class` extended to a model's `model_vocab_size` ids. The model's extra ids
    (SentencePiece stopping short of its target size, or padding up to a multiple) are PAD
    class: never legal, never sampled, never in the data."""
    if len(token_class) > model_vocab_size:
        raise VocabError(f"the vocabulary has {len(token_class)} ids but "
                         f"ModelConfig.vocab_size={model_vocab_size}; raise vocab_size to at "
                         "least that, or use the run's own vocabulary")
    return np.pad(np.asarray(token_class, np.int32), (0, model_vocab_size - len(token_class)),
                  constant_values=modes.PAD_CLASS)


def token_classes(vocab) -> np.ndarray:
    """`token_class[V]` for `modes.PolicyTables.for_vocab`: each id's class."""
    classes = np.full((vocab.vocab_size,), modes.TEXT, np.int32)
    classes[PAD_ID] = modes.PAD_CLASS
    classes[EOS_ID] = modes.EOS_CLASS
    for tag, i in tag_ids(vocab).items():
        classes[i] = modes.TAG_CLASS[tag]
    return classes
