"""Hugging Face export: transformers loads the export with no custom code and computes the
JAX model's logits; its tokenizer gives the SentencePiece ids; the mask processor and the
llguidance grammar allow exactly the policy's tokens; greedy decoding in transformers with
the processor equals the JAX sampler's, token for token. Runs are built without training
(random parameters, tag logits boosted so the mask decides often), saved on an fsdp mesh."""

import dataclasses
import json
import os
import random
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prealign_jax import (hf, inference, main, model as model_lib, modes, partitioning,
                          sampling, tags, train, vocab as vocab_lib)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DEMO = model_lib.ModelConfig(vocab_size=2048, d_model=128, num_layers=4, num_heads=4,
                             num_kv_heads=4, head_dim=None, mlp_dim=512, max_len=256)
# GQA, head_dim != d_model / num_heads, another RoPE base, scanned layers.
GQA_SCAN = model_lib.ModelConfig(vocab_size=512, d_model=64, num_layers=3, num_heads=8,
                                 num_kv_heads=2, head_dim=16, mlp_dim=96, max_len=128,
                                 rope_theta=500.0, scan_layers=True)
TIED = dataclasses.replace(GQA_SCAN, tie_embeddings=True, scan_layers=False, num_layers=2)
CONFIGS = {"demo": DEMO, "gqa_scan": GQA_SCAN, "tied": TIED}


def random_params(cfg, vocab, seed):
    """Initialised parameters with the tag and EOS logits boosted: a random model then
    wants tags often, so the mask changes many greedy choices."""
    dummy = np.zeros((1, 8), np.int32)
    params = jax.tree.map(np.asarray, nn.unbox(model_lib.Decoder(cfg).init(
        jax.random.key(seed), dummy, dummy, dummy)["params"]))
    boost = np.ones((cfg.vocab_size,), np.float32)
    boost[list(vocab_lib.tag_ids(vocab).values()) + [vocab_lib.EOS_ID]] = 6.0
    if cfg.tie_embeddings:
        params["embedding"] = params["embedding"] * boost[:, None]
    else:
        params["logits"] = params["logits"] * boost[None]
    return params


def make_run(workdir, cfg, vocab, seed=0):
    """A run directory as `prealign train` leaves it (run.json, a data dir with the
    vocabulary, an orbax checkpoint at step 3), its parameters saved sharded over fsdp."""
    data_dir = os.path.join(workdir, "data")
    if not os.path.exists(data_dir):  # else a prepared data dir, with its vocabulary
        os.makedirs(data_dir)
        shutil.copyfile(vocab.sentencepiece_model_file,
                        os.path.join(data_dir, vocab_lib.VOCAB_FILE))
    with open(os.path.join(workdir, train.RUN_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(cfg), "data_dir": data_dir}, f)
    params = random_params(cfg, vocab, seed)
    mesh = partitioning.make_mesh(data=1, fsdp=-1)
    sharded = jax.device_put(params, partitioning.param_shardings(
        model_lib.abstract_params(cfg), mesh))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(workdir, "checkpoints", "3", "state"), {"params": sharded})
    ckpt.wait_until_finished()
    return params


@pytest.fixture(scope="module")
def exports(tmp_path_factory, spm_vocab):
    """{config name: (params, run, export dir)}, exported in float32."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        workdir = str(tmp_path_factory.mktemp(name))
        params = make_run(workdir, cfg, spm_vocab, seed=i)
        run = inference.load_run(workdir)
        export_dir = os.path.join(workdir, "hf")
        hf.export_run(run, export_dir, max_shard_size="1MB" if name == "demo" else "5GB")
        out[name] = (params, run, export_dir)
    return out


def jax_logits(cfg, params, ids):
    tokens = np.asarray([ids], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    return np.asarray(model_lib.Decoder(cfg).apply({"params": params}, tokens, positions,
                                                   np.ones_like(tokens)))[0]


def load_hf(export_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32).eval()


def tagged_ids(vocab, n=3, seed=0):
    """`[0, ...]` ids of a few tagged documents, as the model reads them."""
    import conftest

    text = "".join(conftest.sample_documents(n, seed=seed))
    return [vocab_lib.PAD_ID] + list(vocab.encode(text))


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_logits_equal_the_jax_models(exports, spm_vocab, name):
    params, run, export_dir = exports[name]
    ids = tagged_ids(spm_vocab)[:run.model_cfg.max_len]
    model = load_hf(export_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(ours - jax_logits(run.model_cfg, params, ids)).max())
    print(f"{name}: max abs logit diff {diff:.2e} over {len(ids)} tokens")
    assert diff <= 1e-4


def test_large_exports_are_sharded_with_an_index(exports):
    _, _, export_dir = exports["demo"]
    with open(os.path.join(export_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(os.path.exists(os.path.join(export_dir, f)) for f in files)
    assert not os.path.exists(os.path.join(export_dir, "model.safetensors"))


def test_export_config_and_generation_config(exports):
    _, run, export_dir = exports["tied"]
    config = transformers.AutoConfig.from_pretrained(export_dir)
    assert (config.num_key_value_heads, config.head_dim, config.tie_word_embeddings,
            config.rms_norm_eps) == (2, 16, True, 1e-6)
    assert config.rope_parameters["rope_theta"] == 500.0
    generation = transformers.GenerationConfig.from_pretrained(export_dir)
    assert (generation.eos_token_id, generation.pad_token_id) == (1, 0)


def test_bfloat16_export_rounds_the_float32_weights(exports, tmp_path):
    params, run, _ = exports["gqa_scan"]
    hf.export_run(run, str(tmp_path / "bf16"), dtype="bfloat16", policies=("grammar",))
    tensors = {}
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    expected = hf.hf_state_dict(params, run.model_cfg)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, torch.tensor(expected[name]).to(torch.bfloat16)), name


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_through_hf_weights_is_exact(exports, name):
    """export -> params_from_hf -> export gives identical tensors (tied: within the one
    rounding of folding the logit scale into the final norm)."""
    params, run, export_dir = exports[name]
    tensors = hf.read_safetensors(export_dir)
    cfg = hf.model_config_from_hf(export_dir, scan_layers=run.model_cfg.scan_layers)
    assert cfg == dataclasses.replace(run.model_cfg, attention=cfg.attention)
    again = hf.hf_state_dict(hf.params_from_hf(tensors, cfg), cfg)
    assert sorted(again) == sorted(tensors)
    for key, value in tensors.items():
        if cfg.tie_embeddings and key == "model.norm.weight":
            np.testing.assert_allclose(again[key], value, rtol=2 ** -23)
        else:
            np.testing.assert_array_equal(again[key], value, err_msg=key)


# ---------------------------------------------------------------- tokenizer
UNTRUSTED = ["typed <ai> and </quote> here", "<redacted/>", "<\u2060ai>", "a<human>b",
             "  two  spaces\n\nnew lines", "ünïcödé 中文 🙂", "1234567 tabs\there",
             "a </s> b<pad><unk><s>", " </s>", "<ai></s>x<pad>"]


def test_tokenizer_ids_equal_sentencepiece_ids(exports, spm_vocab):
    import conftest

    _, _, export_dir = exports["demo"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    tag_ids = set(vocab_lib.tag_ids(spm_vocab).values())
    control_ids = {vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID}
    texts = (conftest.sample_documents(40, seed=5) + [tags.escape(u) for u in UNTRUSTED]
             + UNTRUSTED)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == list(spm_vocab.encode(text)), text
        assert tokenizer(text)["input_ids"] == [vocab_lib.PAD_ID] + ids  # the document start
        assert tokenizer.decode(ids) == spm_vocab.decode(ids)
    for text in UNTRUSTED:  # escaped: no tag id, and never pad/eos/unk (control pieces)
        ids = set(tokenizer.encode(tags.escape(text), add_special_tokens=False))
        assert not (tag_ids | control_ids) & ids, text
    for tag, i in vocab_lib.tag_ids(spm_vocab).items():  # one id each, decoded as text
        assert tokenizer.convert_ids_to_tokens(i) == tag and tokenizer.decode([i]) == tag
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
            tokenizer.unk_token_id) == (0, 1, 0, 2)
    assert tokenizer.decode([0, 5, 1], skip_special_tokens=True) == tokenizer.decode([5])


# ---------------------------------------------------------------- the mask
def test_modes_json_tables_equal_the_samplers(exports, spm_vocab):
    _, run, export_dir = exports["demo"]
    token_class = vocab_lib.model_token_classes(vocab_lib.token_classes(spm_vocab),
                                                run.model_cfg.vocab_size)
    for policy in hf.DEFAULT_POLICIES:
        loaded = hf.ModeTables.load(export_dir, policy).vocab
        expected = sampling.mask_tables(policy, token_class)
        for a, b in zip(loaded, expected):
            np.testing.assert_array_equal(a, b)


def test_processor_masks_as_sampling_logits(exports):
    """Random scores (with NaN and +-inf), random walks through every policy: the processor's
    scores are -inf exactly where `sampling_logits` (temperature 0, no filter) puts -inf,
    and equal elsewhere."""
    import jax.numpy as jnp

    _, run, export_dir = exports["gqa_scan"]
    rng = np.random.default_rng(0)
    greedy = sampling.SamplingConfig(temperature=0.0, top_p=1.0)
    checked = 0
    for policy in hf.DEFAULT_POLICIES:
        tables = hf.ModeTables.load(export_dir, policy)
        processor = hf.mode_logits_processor(tables)
        ids = np.zeros((4, 1), np.int64)  # the document start
        state = np.full(4, tables.policy.initial)
        for _ in range(30):
            scores = rng.normal(size=(4, tables.vocab.allowed.shape[1])).astype(np.float32)
            scores[rng.random(scores.shape) < 0.01] = np.nan
            scores[0, rng.integers(scores.shape[1])] = np.inf
            scores[1] = -np.inf
            got = processor(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()
            want = np.asarray(sampling.sampling_logits(
                jnp.asarray(scores), jnp.asarray(tables.vocab.allowed[state]), greedy))
            np.testing.assert_array_equal(got, want)
            checked += got.size
            nxt = np.array([rng.choice(np.flatnonzero(tables.vocab.allowed[s])) for s in state])
            state = tables.vocab.next_state[state, nxt]
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
    print(f"processor == sampling_logits on {checked} scores")


def test_greedy_generation_in_transformers_equals_the_sampler(exports, spm_vocab):
    params, run, export_dir = exports["demo"]
    model = load_hf(export_dir)
    cfg = sampling.SamplingConfig(max_new_tokens=40, temperature=0.0)
    changed = 0
    for policy, mode in (("assistant", "ai"), ("grammar", None), ("human_only", "human")):
        prompts = [sampling.make_prompt(text, spm_vocab, policy, mode=mode)
                   for text in ("Tell me about <human>your</human> day.", "")]
        sampler = sampling.Sampler(run.model_cfg, params, spm_vocab, policy, run.mesh, cfg)
        tables = hf.ModeTables.load(export_dir, policy)
        for prompt, sample in zip(prompts, sampler.generate(prompts)):
            processor = hf.mode_logits_processor(tables, start_states=[prompt.state])
            ids = torch.tensor([[vocab_lib.PAD_ID, *prompt.ids]])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                     logits_processor=[processor])
                free = model.generate(ids, attention_mask=torch.ones_like(ids),
                                      do_sample=False, max_new_tokens=cfg.max_new_tokens)
            assert out[0, ids.shape[1]:].tolist() == list(sample.tokens), (policy, prompt.text)
            changed += out[0, ids.shape[1]:].tolist() != free[0, ids.shape[1]:].tolist()
    assert changed  # the mask decided something


# ---------------------------------------------------------------- vLLM grammar
def test_lark_grammar_masks_equal_the_policy_tables(exports):
    """The exported llguidance grammar, compiled by llguidance on the export's tokenizer:
    on random token walks from every reachable state of every policy, its token mask is
    `allowed[state]`, token for token."""
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    _, run, export_dir = exports["demo"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=run.model_cfg.vocab_size)
    rng = random.Random(0)
    steps = tokens = 0
    for policy in hf.DEFAULT_POLICIES:
        tables = hf.ModeTables.load(export_dir, policy)
        allowed, next_state = tables.vocab.allowed, tables.vocab.next_state
        for start in modes.reachable_states(tables.policy):
            path = os.path.join(export_dir, hf.GRAMMAR_DIR,
                                f"{policy}.{tables.policy.states[start]}.lark")
            with open(path) as f:
                grammar = f.read()
            for _ in range(4):
                matcher = llguidance.LLMatcher(ll_tokenizer,
                                               llguidance.grammar_from("lark", grammar))
                assert not matcher.is_error(), matcher.get_error()
                bitmask = llguidance.numpy.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
                state = start
                for _ in range(40):
                    llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
                    mask = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
                    np.testing.assert_array_equal(mask[:allowed.shape[1]].astype(bool),
                                                  allowed[state], err_msg=f"{path} {state}")
                    steps, tokens = steps + 1, tokens + allowed.shape[1]
                    # a random allowed class, then a random id of it: tags come often
                    classes = sorted({int(tables.token_class[i])
                                      for i in np.flatnonzero(allowed[state])})
                    cls = rng.choice(classes)
                    token = rng.choice([int(i) for i in np.flatnonzero(allowed[state])
                                        if tables.token_class[i] == cls])
                    if token == vocab_lib.EOS_ID:
                        break
                    assert matcher.consume_token(token), matcher.get_error()
                    state = int(next_state[state, token])
    print(f"llguidance mask == allowed[state] at {steps} steps, {tokens} token decisions")
    assert steps > 100


# ---------------------------------------------------------------- the CLI and bad input
def test_cli_export_writes_a_loadable_directory(exports, tmp_path, capsys):
    _, run, _ = exports["gqa_scan"]
    out = tmp_path / "cli"
    assert main.main(["export", f"--workdir={run.workdir}", f"--out={out}", "--step=3",
                      "--policies=assistant"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert sorted(json.load(open(out / hf.MODES_FILE))["policies"]) == ["assistant"]
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token_id == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left


def cli_error(argv, capsys):
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prealign: error: "), err
    return err[0][len("prealign: error: "):]


def test_cli_export_refuses_bad_input_in_one_line(exports, tmp_path, capsys):
    _, run, _ = exports["gqa_scan"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert (f"--out={full} exists and is not empty" in
            cli_error(["export", f"--workdir={run.workdir}", f"--out={full}"], capsys))
    assert (full / "x").read_text() == "keep me"
    out = tmp_path / "new"
    assert "unknown policy 'nope'" in cli_error(
        ["export", f"--workdir={run.workdir}", f"--out={out}", "--policies=grammar,nope"],
        capsys)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert "no checkpoint in" in cli_error(
        ["export", f"--workdir={empty}", f"--out={out}"], capsys)
    assert "has no checkpoint of that step" in cli_error(
        ["export", f"--workdir={run.workdir}", f"--out={out}", "--step=7"], capsys)
    assert "--max_shard_size=lots" in cli_error(
        ["export", f"--workdir={run.workdir}", f"--out={out}", "--max_shard_size=lots"],
        capsys)
    assert sorted(os.listdir(tmp_path)) == ["empty_run", "full"]  # nothing written


def test_a_failed_export_leaves_nothing_behind(exports, tmp_path, monkeypatch):
    _, run, _ = exports["gqa_scan"]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        hf.export_run(run, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_another_architecture_is_refused(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path))
    with pytest.raises(hf.HFError, match="a 'gpt2' checkpoint .*only Llama-layout"):
        hf.model_config_from_hf(str(tmp_path))


# ---------------------------------------------------------------- lm-eval-harness
@pytest.mark.slow
def test_lm_eval_runs_the_local_tasks_on_an_export(tmp_path, capsys):
    """`prealign export` writes lm-eval tasks over the held-out split; `lm_eval --model hf`
    runs them on the export (no hub access)."""
    import subprocess
    import sys

    from prealign_jax.data import prepare

    workdir = str(tmp_path / "run")
    prepare.prepare(workdir=workdir, num_scenarios=300, vocab_size=512, vocab_documents=300,
                    validation_fraction=0.25, num_shards={"train": 1, "validation": 1})
    vocab = vocab_lib.load_dir(os.path.join(workdir, "data"))
    make_run(workdir, dataclasses.replace(GQA_SCAN, max_len=1024), vocab)
    out = tmp_path / "hf"
    assert main.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
    assert "lm-eval tasks in" in capsys.readouterr().out
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={out},dtype=float32", "--tasks", "prealign", "--include_path",
         str(out / hf.LM_EVAL_DIR), "--device", "cpu", "--limit", "6", "--batch_size", "4",
         "--output_path", str(results)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = [os.path.join(d, f) for d, _, files in os.walk(results) for f in files
              if f.startswith("results")]
    metrics = json.load(open(path))["results"]
    print({task: {k: v for k, v in m.items() if "," in k} for task, m in metrics.items()})
    assert 0 <= metrics["prealign_choice"]["acc,none"] <= 1
    for mode in ("doc", "human", "ai"):
        assert metrics[f"prealign_ppl_{mode}"]["bits_per_byte,none"] > 0


def test_export_without_the_hf_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    assert cli_error(["export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"],
                     capsys) == "torch not installed: pip install 'prealign-jax[hf]'"
