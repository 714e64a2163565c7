"""The SentencePiece vocabulary: tags are atomic ids in every context; exact round-trips."""

import pytest
from hypothesis import given, settings, strategies as st

from prealign_jax import modes, tags, vocab

from conftest import WORDS, piece_classes, sample_documents

CONTEXTS = ["{t}", "x {t}", "word{t}word", "{t}.", "{t}{t}{t}", " {t} ", "({t})", "\n{t}\n",
            "{t}Hello", "é{t}漢"]


@pytest.mark.parametrize("context", CONTEXTS)
def test_every_tag_is_one_id_in_every_context(spm_vocab, context):
    ids_of = vocab.tag_ids(spm_vocab)
    for tag, tag_id in ids_of.items():
        text = context.format(t=tag)
        ids = spm_vocab.encode(text)
        assert ids.count(tag_id) == text.count(tag), (text, ids)
        pieces = [spm_vocab.tokenizer.id_to_piece(i) for i in ids]
        assert all(tag not in p or p == tag for p in pieces), pieces
        assert spm_vocab.decode(ids) == text


def test_no_phantom_space_before_a_tag_at_text_start(spm_vocab):
    ids = spm_vocab.encode("<ai>Sure.</ai>")
    assert ids[0] == vocab.tag_ids(spm_vocab)["<ai>"]


def test_special_ids_and_token_classes(spm_vocab):
    assert (spm_vocab.pad_id, spm_vocab.eos_id, spm_vocab.unk_id) == (0, 1, 2)
    classes = vocab.token_classes(spm_vocab)
    assert classes.shape == (spm_vocab.vocab_size,)
    assert classes[0] == modes.PAD_CLASS and classes[1] == modes.EOS_CLASS
    for tag, i in vocab.tag_ids(spm_vocab).items():
        assert classes[i] == modes.TAG_CLASS[tag]
    assert (classes == modes.TEXT).sum() == spm_vocab.vocab_size - 9


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list(modes.TAGS) + WORDS + [" ", "  ", "\n", "\t", ".", "ü",
                                                         "😀", "<", "ai>", tags.JOINER]),
                max_size=30))
def test_decode_encode_is_identity(spm_vocab, parts):
    text = "".join(parts)
    assert spm_vocab.decode(spm_vocab.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_escaped_text_never_yields_a_tag_id(spm_vocab, raw):
    tag_id_set = set(vocab.tag_ids(spm_vocab).values())
    for text in (raw, raw.replace("x", "<ai>")):
        ids = spm_vocab.encode(tags.escape(text))
        assert not tag_id_set & set(ids)
        assert tags.unescape(spm_vocab.decode(ids)) == text.replace("\u2581", " ")


# Text fragments that spell tags or parts of tags when run together, look-alikes included.
SPELLERS = ["<", "</", ">", "/>", "/", "ai", "human", "quote", "redacted", "ai>", "/ai>",
            "human>", "quote>", "redacted/>", tags.JOINER, "\uff1c", "\u2039", "\ufe64",
            "x", " ", "\n", "word"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPELLERS), st.sampled_from(modes.TAGS),
                          st.integers(0, 10**6)), max_size=40))
def test_decoded_text_reparses_to_the_ids_modes(spm_vocab, parts):
    """Random id sequences, text runs spelling every tag among them: the decoded text holds
    a tag exactly where an id was a tag, its text runs unescape to the ids' text, and the
    grammar reads the same states from it as from the ids."""
    ids_of = vocab.tag_ids(spm_vocab)
    ids = []
    for part in parts:
        if isinstance(part, int):  # any text id
            ids.append(3 + part % (spm_vocab.vocab_size - 3))
        elif part in ids_of:
            ids.append(ids_of[part])
        else:  # the text's pieces, not the tag: SentencePiece would extract a whole tag
            ids += spm_vocab.encode(part)
    text = vocab.decode_tagged(spm_vocab, ids + [vocab.EOS_ID])
    classes = vocab.token_classes(spm_vocab)[ids]
    assert tags.token_classes(text).tolist() == piece_classes(classes)
    runs = [p for _, p, is_tag in tags.pieces(text) if not is_tag]
    id_runs, run = [], []
    for i, c in zip(ids + [None], list(classes) + [None]):
        if c == modes.TEXT:
            run.append(i)
        elif run:
            id_runs.append(spm_vocab.decode(run))
            run = []
    assert [tags.unescape(r) for r in runs] == id_runs
    grammar = modes.grammar_tables()
    by_ids = modes.run_numpy(grammar, classes[None])[2][0] if ids else grammar.initial
    by_text = modes.run_numpy(grammar, tags.token_classes(text)[None])[2][0] if text \
        else grammar.initial
    assert by_ids == by_text
    if modes.is_well_formed(grammar, classes):
        tags.validate(text)


def test_model_token_classes_pad_with_never_legal_ids(spm_vocab):
    classes = vocab.token_classes(spm_vocab)
    padded = vocab.model_token_classes(classes, len(classes) + 5)
    assert padded[:len(classes)].tolist() == classes.tolist()
    assert (padded[len(classes):] == modes.PAD_CLASS).all()
    with pytest.raises(vocab.VocabError, match="raise vocab_size"):
        vocab.model_token_classes(classes, len(classes) - 1)


def test_text_spelling_a_tag_decodes_escaped(spm_vocab):
    ids = spm_vocab.encode("<") + spm_vocab.encode("ai>") + spm_vocab.encode(" hi")
    assert spm_vocab.decode(ids) == "<ai> hi"  # what a naive decode shows a parser
    assert vocab.decode_tagged(spm_vocab, ids) == f"<{tags.JOINER}ai> hi"
    ai = vocab.tag_ids(spm_vocab)["<ai>"]
    assert vocab.decode_tagged(spm_vocab, [ai] + ids + [vocab.EOS_ID]) == \
        f"<ai><{tags.JOINER}ai> hi"


def test_tensorflow_encoding_matches_python(spm_vocab):
    tf = pytest.importorskip("tensorflow")
    for doc in sample_documents(5, seed=1):
        ids = spm_vocab.encode(doc)
        assert spm_vocab.encode_tf(tf.constant(doc)).numpy().tolist() == ids
        assert spm_vocab.decode_tf(tf.constant(ids)).numpy().decode() == doc


def test_training_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a.model"), str(tmp_path / "b.model")
    docs = sample_documents(100)
    vocab.train(docs, a, 400)
    vocab.train(docs, b, 400)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(vocab.VocabError, match="does not exist"):
        vocab.load(str(tmp_path / "nope.model"))


def test_garbage_model_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(vocab.VocabError, match="not a SentencePiece model"):
        vocab.load(str(bad))


def test_model_without_tag_symbols_is_rejected(tmp_path):
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_documents(100)),
                                   model_writer=proto, vocab_size=300, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(proto.getvalue())
    with pytest.raises(vocab.VocabError, match="user-defined symbol"):
        vocab.load(str(path))


def test_too_small_vocab_size_is_a_user_error(tmp_path):
    with pytest.raises(vocab.VocabError, match="vocab_size=100 is too small"):
        vocab.train(sample_documents(10), str(tmp_path / "v.model"), 100)
