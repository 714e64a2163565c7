"""`prealign import`: a random tiny Llama (GQA, a Llama-2-style BPE tokenizer with byte
fallback) becomes a run whose JAX logits equal transformers' on the same text, whose new
tag rows are the mean rows, whose data pipeline tokenizes with the imported tokenizer (the
escaping guarantee kept) and which `prealign train` continues; export -> import -> export
gives identical tensors; each bad input is a one-line error that leaves nothing behind."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from prealign_jax import hf, hf_import, inference, main, model as model_lib, tags
from prealign_jax import vocab as vocab_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import conftest  # noqa: E402
from test_hf import GQA_SCAN, TIED, cli_error, jax_logits, make_run  # noqa: E402

LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=model_lib.RMSNorm.eps, rope_theta=500.0)
HOSTILE = ["a </s> b<s><unk>", "<ai>typed</ai> <redacted/>", "<\u2060ai>", "ünï 🙂 tabs\t"]


def plain_texts(n, seed=0):
    """The sample documents with their tags stripped: what an open model was trained on."""
    return [tags.unescape("".join(p for _, p, is_tag in tags.pieces(d) if not is_tag))
            for d in conftest.sample_documents(n, seed=seed)]


def llama2_tokenizer():
    """A Llama-2-style tokenizer: BPE with byte fallback, <unk> <s> </s> at ids 0 1 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(plain_texts(200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    trained = json.loads(tok.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    pieces[3:3] = [f"<0x{b:02X}>" for b in range(256)]  # byte pieces after the specials
    tok.model = models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                           merges=[tuple(m) for m in trained["merges"]],
                           unk_token="<unk>", byte_fallback=True)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_llama(path, tokenizer, vocab_size, tie, seed, **kwargs):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tie,
                                      bos_token_id=1, eos_token_id=2, **LLAMA)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path), **kwargs)
    tokenizer.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{name: (hf model, hf dir, workdir)}: "spare" has spare embedding rows the tags
    take (untied, sharded safetensors, scanned layers; `prealign import`); "grown" has
    none: the vocabulary grows to a multiple of 128 (tied embeddings, separate layers)."""
    tokenizer = llama2_tokenizer()
    out = {}
    for seed, (name, rows, tie, scan) in enumerate(
            [("spare", len(tokenizer) + 20, False, True),
             ("grown", len(tokenizer), True, False)]):
        root = tmp_path_factory.mktemp(name)
        model = save_llama(root / "hf", tokenizer, rows, tie, seed, max_shard_size="40KB")
        if scan:  # (the CLI, which also writes model.gin)
            assert main.main(["import", f"--hf_dir={root / 'hf'}",
                              f"--workdir={root / 'run'}"]) == 0
        else:
            hf_import.import_checkpoint(str(root / "hf"), str(root / "run"), scan_layers=False)
        out[name] = (model, str(root / "hf"), str(root / "run"))
    return out


def test_sharded_checkpoint_fixture_has_an_index(imported):
    assert os.path.exists(os.path.join(imported["spare"][1], "model.safetensors.index.json"))


@pytest.mark.parametrize("name", ["spare", "grown"])
def test_imported_logits_equal_transformers_and_tag_rows_are_the_mean(imported, name):
    model, hf_dir, workdir = imported[name]
    run = inference.load_run(workdir)
    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = " ".join(plain_texts(6, seed=3))
    hf_ids = ([original.bos_token_id]
              + original(text, add_special_tokens=False)["input_ids"])[:128]
    ids = ([vocab_lib.PAD_ID] + list(run.vocab.encode(text)))[:128]
    source = hf_import.run_tokenizer(hf_dir).source
    assert [int(source[i]) for i in ids] == hf_ids  # the same tokens, in the run's ids
    with torch.no_grad():
        theirs = model(torch.tensor([hf_ids])).logits[0].numpy()
    ours = jax_logits(run.model_cfg, run.params, ids)
    n = len(original)  # the original tokens' logits, in the checkpoint's order
    diff = float(np.abs(ours[:, np.argsort(source)[:n]] - theirs[:, :n]).max())
    print(f"{name}: max abs logit diff {diff:.2e} over {len(ids)} tokens")
    assert diff <= 1e-4
    embed = model.model.embed_tokens.weight.detach().numpy()
    head = model.lm_head.weight.detach().numpy()
    tag_ids = list(vocab_lib.tag_ids(run.vocab).values())
    assert len(set(tag_ids)) == 7 and min(tag_ids) >= len(original)
    np.testing.assert_allclose(np.asarray(run.params["embedding"])[tag_ids],
                               np.repeat(embed[:len(original)].mean(0)[None], 7, 0), atol=1e-7)
    if not run.model_cfg.tie_embeddings:
        np.testing.assert_allclose(np.asarray(run.params["logits"])[:, tag_ids].T,
                                   np.repeat(head[:len(original)].mean(0)[None], 7, 0),
                                   atol=1e-7)
    rows = len(original) + 20 if name == "spare" else -(-(len(original) + 7) // 128) * 128
    assert run.model_cfg.vocab_size == rows


def test_imported_tokenizer_keeps_the_escaping_guarantee(imported):
    run = inference.load_run(imported["spare"][2])
    vocab = run.vocab
    assert isinstance(vocab, vocab_lib.TokenizerVocabulary)
    tag_ids = vocab_lib.tag_ids(vocab)
    control = {vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID}
    for text in HOSTILE:
        escaped = vocab.encode(tags.escape(text))
        assert not (set(tag_ids.values()) | control) & set(escaped), text
        assert vocab.decode(escaped) == tags.escape(text)
    assert vocab.encode("<ai>x</ai>")[0] == tag_ids["<ai>"]  # tags in text still match
    import tensorflow as tf

    batch = vocab.encode_tf(tf.constant(HOSTILE))
    assert [list(r) for r in batch.to_list()] == [vocab.encode(t) for t in HOSTILE]
    assert list(vocab.encode_tf(tf.constant(HOSTILE[0])).numpy()) == vocab.encode(HOSTILE[0])


def test_prepare_train_sample_and_export_an_imported_run(imported, tmp_path, capsys):
    """The corpus tokenized with the imported tokenizer (prepare --tokenizer); `prealign
    train` starts from the imported parameters (the first step's learning rate is 0:
    step 1 holds them unchanged) with a fresh optimizer; sample and export load it."""
    from prealign_jax import tasks
    from prealign_jax.data import pipeline, prepare

    _, hf_dir, source = imported["spare"]
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    with open(os.path.join(workdir, "run.json")) as f:
        info = json.load(f)
    info["data_dir"] = os.path.join(workdir, "data")
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump(info, f)
    tokenizer_file = os.path.join(workdir, "data", vocab_lib.TOKENIZER_FILE)
    assert "holds an imported tokenizer; prepare with it: --tokenizer=" in cli_error(
        ["prepare", f"--workdir={workdir}"], capsys)
    prepare.prepare(workdir=workdir, num_scenarios=150, num_shards={"train": 1,
                    "validation": 1}, validation_fraction=0.2, tokenizer_file=tokenizer_file)
    vocab = vocab_lib.load_dir(os.path.join(workdir, "data"))
    tasks.register(os.path.join(workdir, "data"), mixture="imported_test")
    iterator = pipeline.DataIterator(pipeline.get_dataset("imported_test", "train", 2, 64,
                                                          seed=0))
    first = next(iterator)["decoder_target_tokens"]
    assert set(vocab_lib.tag_ids(vocab).values()) & set(first.ravel())
    assert vocab_lib.UNK_ID not in first and first.max() < vocab.vocab_size
    iterator.save(str(tmp_path / "position"))  # resumable through tf.py_function
    after = next(iterator)
    iterator.restore(str(tmp_path / "position"))
    np.testing.assert_array_equal(next(iterator)["decoder_target_tokens"],
                                  after["decoder_target_tokens"])

    assert main.main(["train", f"--workdir={workdir}", "--gin_file=runs/cpu_demo.gin",
                      f"--gin_file={os.path.join(workdir, main.MODEL_GIN)}",
                      "--gin_file=meshes/cpu_data8.gin", "--gin.train.num_steps=1",
                      "--gin.train.batch_size=8", "--gin.train.checkpoint_every=1",
                      "--gin.train.eval_every=0", "--gin.train.peak_flops_per_device=1e10",
                      "--gin.seqio_data.eval_split=None"]) == 0
    assert "starting from the parameters in" in capsys.readouterr().out
    start, trained = (inference.load_run(workdir, step=s) for s in (0, 1))
    for a, b in zip(*(jax_leaves(r.params) for r in (start, trained))):
        np.testing.assert_array_equal(a, b)

    assert main.main(["sample", f"--workdir={workdir}", "--num_samples=1",
                      "--max_new_tokens=8", "--prompt=Hi </s> <ai>"]) == 0
    assert "(step 1)" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert main.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    text = tags.escape(HOSTILE[0]) + "<ai>hello</ai>"
    assert exported(text, add_special_tokens=False)["input_ids"] == vocab.encode(text)


def jax_leaves(params):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("config", ["gqa_scan", "tied"])
def test_export_import_export_is_identical(tmp_path, spm_vocab, config):
    """Our own export imported: the tags are found as added tokens with their ids (nothing
    added, no id moved), so the second export's tensors and tokenizer equal the first's."""
    cfg = {"gqa_scan": GQA_SCAN, "tied": TIED}[config]
    first_run = str(tmp_path / "first")
    os.makedirs(first_run)
    make_run(first_run, cfg, spm_vocab)
    hf.export_run(inference.load_run(first_run), str(tmp_path / "e1"), policies=("grammar",))
    hf_import.import_checkpoint(str(tmp_path / "e1"), str(tmp_path / "second"),
                                scan_layers=cfg.scan_layers)
    second = inference.load_run(str(tmp_path / "second"))
    assert second.model_cfg == dataclasses.replace(cfg, attention=second.model_cfg.attention)
    assert vocab_lib.tag_ids(second.vocab) == vocab_lib.tag_ids(spm_vocab)
    hf.export_run(second, str(tmp_path / "e2"), policies=("grammar",))
    one, two = (hf.read_safetensors(str(tmp_path / e)) for e in ("e1", "e2"))
    assert sorted(one) == sorted(two)
    for key in one:
        if cfg.tie_embeddings and key == "model.norm.weight":  # (the folded logit scale)
            np.testing.assert_allclose(two[key], one[key], rtol=2 ** -23)
        else:
            np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    tok1, tok2 = (transformers.AutoTokenizer.from_pretrained(str(tmp_path / e))
                  for e in ("e1", "e2"))
    assert tok1.get_vocab() == tok2.get_vocab()
    for text in conftest.sample_documents(5) + HOSTILE:
        assert tok1(text)["input_ids"] == tok2(text)["input_ids"] == \
            [0] + list(spm_vocab.encode(text))
    spec1, spec2 = (json.load(open(tmp_path / e / hf.MODES_FILE)) for e in ("e1", "e2"))
    assert spec1 == spec2


# ---------------------------------------------------------------- bad input
def test_import_refuses_bad_input_in_one_line(imported, tmp_path, capsys):
    _, hf_dir, workdir = imported["spare"]
    new = tmp_path / "new"

    def refused(argv):
        capsys.readouterr()  # (what building the inputs printed)
        message = cli_error(["import", *argv], capsys)
        assert not new.exists()  # nothing half-written
        return message

    assert "needs --hf_dir" in refused([f"--workdir={new}"])
    assert f"--hf_dir={tmp_path / 'nope'} is not a directory" in refused(
        [f"--hf_dir={tmp_path / 'nope'}", f"--workdir={new}"])
    assert f"--workdir={workdir} already has checkpoints" in cli_error(
        ["import", f"--hf_dir={hf_dir}", f"--workdir={workdir}"], capsys)
    assert "already holds a vocabulary (tokenizer.json)" in refused(
        [f"--hf_dir={hf_dir}", f"--workdir={new}", f"--data_dir={workdir}/data"])

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(str(gpt2))
    assert "a 'gpt2' checkpoint" in refused([f"--hf_dir={gpt2}", f"--workdir={new}"])

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(hf_dir, no_tokenizer)
    for name in os.listdir(no_tokenizer):
        if "token" in name:
            os.remove(no_tokenizer / name)
    assert "no tokenizer AutoTokenizer can load" in refused(
        [f"--hf_dir={no_tokenizer}", f"--workdir={new}"])

    tagged = tmp_path / "tagged"  # a tokenizer with <ai> as an ordinary token
    shutil.copytree(hf_dir, tagged)
    spec = json.load(open(tagged / "tokenizer.json"))
    spec["model"]["vocab"]["<ai>"] = len(spec["model"]["vocab"])
    json.dump(spec, open(tagged / "tokenizer.json", "w"))
    message = refused([f"--hf_dir={tagged}", f"--workdir={new}"])
    assert message == (f"{tagged}: the tokenizer already has <ai> as an ordinary token (id "
                       f"{spec['model']['vocab']['<ai>']}); prealign needs each tag as its own "
                       "token: import a checkpoint whose tokenizer lacks it")


def test_a_tokenizer_whose_text_reaches_a_special_token_is_refused(imported, tmp_path):
    """A Unigram model that holds `</s>` as an ordinary piece: text would produce EOS."""
    from tokenizers import Tokenizer, models

    _, hf_dir, _ = imported["spare"]
    reachable = tmp_path / "reachable"
    shutil.copytree(hf_dir, reachable)
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [
        (c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz <>/▁"]
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=0)), bos_token="<s>",
        eos_token="</s>", unk_token="<unk>")
    for name in os.listdir(reachable):
        if "token" in name:
            os.remove(reachable / name)
    tok.save_pretrained(str(reachable))
    with pytest.raises(hf.HFError, match=r"the text '<s>' encodes to the special token"):
        hf_import.import_checkpoint(str(reachable), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
