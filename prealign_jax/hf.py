"""Hugging Face interop: a run exported as a Llama checkpoint, the mode mask outside JAX.

- `export_run`: a directory `transformers.AutoModelForCausalLM` / `AutoTokenizer` load with
  no custom code — a `LlamaForCausalLM` config, safetensors weights (sharded with an index
  above `max_shard_size`), the run's tokenizer (SentencePiece converted, every id kept, or
  the imported one; both encode text exactly as the data pipeline does: the tags are
  matched in text, pad/eos/unk are special tokens text cannot produce), a generation config and
  `modes.json`: the grammar, and each exported policy as the compact tables `token_class[V]`
  + `delta[S, C]` that `modes.PolicyTables.for_vocab` expands, so the mask outside JAX is
  computed by the same code as inside. `grammars/` holds each policy as an llguidance lark
  grammar (vLLM's structured outputs). Written to a temporary directory, then renamed.
- `params_from_hf`: the inverse weight mapping (import of a Llama-layout checkpoint).
- `mode_logits_processor`: a transformers `LogitsProcessor` from `modes.json` that tracks
  each row's policy state and masks exactly as `sampling.sampling_logits` does.

The model's one difference from Llama, the logit scale d_model^-1/2 of tied embeddings, is
folded into the final norm's scale (logits are linear in it). The model reads `[0, ids...]`
(seqio's shifted targets: id 0, pad, starts every document), so the tokenizer's BOS is
`<pad>`: `tokenizer(text)` gives `[0] + ids`, `add_special_tokens=False` the ids alone.

torch, transformers, safetensors and llguidance are imported inside functions: they are
the optional extra `prealign-jax[hf]`; the core install stays JAX-only.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from prealign_jax import lm_eval_tasks, model as model_lib, modes, sampling
from prealign_jax import vocab as vocab_lib
from prealign_jax.errors import UserError

MODES_FILE = "modes.json"
MODES_FORMAT, MODES_VERSION = "prealign-modes", 1
GRAMMAR_DIR = "grammars"  # <policy>.<state>.lark: the policy from that state on
SP_MODEL_FILE = "sentencepiece.model"  # a SentencePiece run's vocabulary, copied
LM_EVAL_DIR = "lm_eval"  # task YAMLs and data (lm_eval --include_path DIR/lm_eval)
DEFAULT_POLICIES = tuple(p.name for p in modes.BUILT_IN)
DTYPES = ("float32", "bfloat16")
INSTALL_HINT = "pip install 'prealign-jax[hf]'"


class HFError(UserError):
    """A run, directory or checkpoint that cannot be exported or imported (names it and
    what to do)."""


def require(*names: str) -> None:
    """Fail in one line, with the install command, if an optional dependency is missing."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise HFError(f"{', '.join(missing)} not installed: {INSTALL_HINT}")


# ---------------------------------------------------------------- weights
def _layers(params: Mapping, cfg: model_lib.ModelConfig) -> list[dict]:
    """Per-layer parameter trees, whether the layers are separate or scanned (stacked on
    axis 0 under "layers")."""
    import jax

    if cfg.scan_layers:
        return [jax.tree.map(lambda x, i=i: x[i], params["layers"])
                for i in range(cfg.num_layers)]
    return [params[f"layers_{i}"] for i in range(cfg.num_layers)]


def hf_state_dict(params: Mapping, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
    """The decoder's parameters as `LlamaForCausalLM` tensors (float32 numpy, [out, in])."""
    f32 = lambda x: np.asarray(x, np.float32)
    d = cfg.d_model
    out = {"model.embed_tokens.weight": f32(params["embedding"])}
    for i, layer in enumerate(_layers(params, cfg)):
        attn, mlp, p = layer["attention"], layer["mlp"], f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = f32(attn["query"]).reshape(d, -1).T
        out[p + "self_attn.k_proj.weight"] = f32(attn["key"]).reshape(d, -1).T
        out[p + "self_attn.v_proj.weight"] = f32(attn["value"]).reshape(d, -1).T
        out[p + "self_attn.o_proj.weight"] = f32(attn["out"]).reshape(-1, d).T
        out[p + "mlp.gate_proj.weight"] = f32(mlp["wi"])[:, 0].T
        out[p + "mlp.up_proj.weight"] = f32(mlp["wi"])[:, 1].T
        out[p + "mlp.down_proj.weight"] = f32(mlp["wo"]).T
        out[p + "input_layernorm.weight"] = f32(layer["pre_attention_norm"]["scale"])
        out[p + "post_attention_layernorm.weight"] = f32(layer["pre_mlp_norm"]["scale"])
    norm = f32(params["final_norm"]["scale"])
    if cfg.tie_embeddings:
        norm = norm * _tied_logit_scale(cfg)
    else:
        out["lm_head.weight"] = f32(params["logits"]).T
    out["model.norm.weight"] = norm
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _tied_logit_scale(cfg: model_lib.ModelConfig) -> np.float32:
    """The factor `model.Decoder` multiplies tied-embedding logits by."""
    return np.float32(cfg.d_model ** -0.5)


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: model_lib.ModelConfig) -> dict:
    """Inverse of `hf_state_dict`: the parameter tree of `model.Decoder(cfg)`."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head
    t = lambda name: np.asarray(tensors[name], np.float32)
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers.append({
            "attention": {"query": t(p + "self_attn.q_proj.weight").T.reshape(d, h, hd),
                          "key": t(p + "self_attn.k_proj.weight").T.reshape(d, kv, hd),
                          "value": t(p + "self_attn.v_proj.weight").T.reshape(d, kv, hd),
                          "out": t(p + "self_attn.o_proj.weight").T.reshape(h, hd, d)},
            "mlp": {"wi": np.stack([t(p + "mlp.gate_proj.weight").T,
                                    t(p + "mlp.up_proj.weight").T], axis=1),
                    "wo": t(p + "mlp.down_proj.weight").T},
            "pre_attention_norm": {"scale": t(p + "input_layernorm.weight")},
            "pre_mlp_norm": {"scale": t(p + "post_attention_layernorm.weight")}})
    params: dict[str, Any] = {"embedding": t("model.embed_tokens.weight")}
    if cfg.scan_layers:
        params["layers"] = {k: _stack([layer[k] for layer in layers]) for k in layers[0]} \
            if layers else {}
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    norm = t("model.norm.weight")
    if cfg.tie_embeddings:
        norm = (norm.astype(np.float64) / _tied_logit_scale(cfg)).astype(np.float32)
    else:
        params["logits"] = t("lm_head.weight").T
    params["final_norm"] = {"scale": norm}
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda x: np.ascontiguousarray(x).astype(dtype), params)


def _stack(trees: list) -> Any:
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def llama_config(cfg: model_lib.ModelConfig, dtype: str):
    """The `transformers.LlamaConfig` of the decoder."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dims_per_head,
        max_position_embeddings=cfg.max_len, rms_norm_eps=model_lib.RMSNorm.eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False,
        mlp_bias=False, bos_token_id=vocab_lib.PAD_ID, eos_token_id=vocab_lib.EOS_ID,
        pad_token_id=vocab_lib.PAD_ID, architectures=["LlamaForCausalLM"], dtype=dtype)


def model_config_from_hf(hf_dir: str, scan_layers: bool = False) -> model_lib.ModelConfig:
    """The ModelConfig of a Llama-layout checkpoint; another architecture, or a Llama
    feature the decoder lacks (biases, rope scaling, another activation), is refused."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except FileNotFoundError:
        raise HFError(f"{hf_dir}: no config.json; point at a Hugging Face model "
                      "directory (save_pretrained output)") from None
    except ValueError as e:
        raise HFError(f"{path}: not JSON ({e})") from None
    if c.get("model_type") != "llama":
        raise HFError(f"{hf_dir}: a {c.get('model_type')!r} checkpoint "
                      f"({', '.join(c.get('architectures') or ['no architectures'])}); only "
                      "Llama-layout checkpoints (model_type 'llama') can be imported")
    rope = c.get("rope_parameters") or {"rope_type": "default",
                                        "rope_theta": c.get("rope_theta", 10000.0)}
    unsupported = {k: v for k, v in (("attention_bias", c.get("attention_bias", False)),
                                     ("mlp_bias", c.get("mlp_bias", False)),
                                     ("hidden_act", c.get("hidden_act", "silu")),
                                     ("rope_type", rope.get("rope_type", "default")),
                                     ("rope_scaling", c.get("rope_scaling")))
                   if v not in (False, "silu", "default", None)}
    if unsupported:
        raise HFError(f"{path}: {unsupported} has no counterpart in prealign's decoder; "
                      "import a plain Llama checkpoint (no biases, silu, default RoPE)")
    if abs(c.get("rms_norm_eps", 1e-6) - model_lib.RMSNorm.eps) > 1e-12:
        raise HFError(f"{path}: rms_norm_eps={c['rms_norm_eps']}, prealign's RMSNorm uses "
                      f"{model_lib.RMSNorm.eps}; import a checkpoint trained with it")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return model_lib.ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == c["hidden_size"] else head_dim,
        mlp_dim=c["intermediate_size"], max_len=c["max_position_embeddings"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        rope_theta=float(rope["rope_theta"]), scan_layers=scan_layers)


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (one file or shards with an index), float32 numpy."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HFError(f"{hf_dir}: no model.safetensors (or index); save the model with "
                      "save_pretrained(safe_serialization=True)")
    out = {}
    for name in files:
        with safe_open(os.path.join(hf_dir, name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).float().numpy()
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], out_dir: str, dtype: str,
                      max_shard_bytes: int) -> list[str]:
    """Write `tensors` in `dtype` as `model.safetensors`, or as shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`. Returns the files."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    shards: list[dict] = [{}]
    size = total = 0
    for name, array in tensors.items():
        tensor = torch.from_numpy(np.array(array, np.float32)).to(torch_dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total},
             "weight_map": {k: name for shard, name in zip(shards, names) for k in shard}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return names + ["model.safetensors.index.json"]


def parse_size(text: str) -> int:
    """Bytes of '5GB', '500MB', '64KB' or a plain integer (--max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", str(text), re.IGNORECASE)
    if not m or int(m.group(1)) < 1:
        raise HFError(f"--max_shard_size={text}: give a size such as 5GB, 500MB or bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}[unit]
    return int(m.group(1)) * scale


# ---------------------------------------------------------------- tokenizer
def hf_tokenizer(vocab):
    """The run's vocabulary (`vocab.load_dir`) as a transformers fast tokenizer with the
    same ids that encodes every text as the data pipeline does: an imported tokenizer as
    it is, a SentencePiece model converted (`sentencepiece_tokenizer`)."""
    require("tokenizers", "transformers")
    from tokenizers import Tokenizer

    if isinstance(vocab, vocab_lib.TokenizerVocabulary):
        return transformers_tokenizer(Tokenizer.from_str(vocab.tokenizer.to_str()))
    return transformers_tokenizer(sentencepiece_tokenizer(vocab))


def sentencepiece_tokenizer(vocab):
    """A SentencePiece vocabulary (`vocab.load`) as a `tokenizers.Tokenizer` with the same
    ids and the same segmentation of every text.

    Unigram pieces and scores, byte fallback, whitespace as `▁` split before each `▁` (no
    dummy prefix, identity normalization: the conventions `vocab.py` trains with). As in
    SentencePiece, the tags are matched in any text (added tokens, not special: decoded as
    text, like SentencePiece's user-defined symbols), so untrusted text goes through
    `tags.escape` first, while pad, eos and unk (control pieces) are unreachable from text:
    they are named `<pad>▁`, `</s>▁`, `<unk>▁` (a `▁` after a piece's first character never
    survives the Metaspace split, so a literal `</s>` is ordinary text; a low score would
    not do: the Unigram model's unknown-character penalty follows the lowest score) and
    decoded as `<pad>`, `</s>`, `<unk>`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    proto = vocab_lib._model_proto(vocab.tokenizer)
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        raise HFError(f"vocabulary {vocab.sentencepiece_model_file} is not a unigram "
                      "SentencePiece model; export supports unigram vocabularies (prealign "
                      "prepare's default)")
    control = {p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)}
    tok = Tokenizer(models.Unigram(
        [(p.piece + "▁" if p.piece in control else p.piece, p.score) for p in proto.pieces],
        unk_id=vocab_lib.UNK_ID, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                 split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(c + "▁", c) for c in sorted(control)]
        + [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == p.USER_DEFINED])
    return tok


def mark_run_specials(tok) -> list[str]:
    """Make ids 0, 1, 2 of a `tokenizers.Tokenizer` in the run's layout (`vocab.py`: id 0
    starts every document and pads, 1 is EOS, 2 is UNK) special tokens, and id 0 the
    first of `tok.encode(text)`; returns their names."""
    from tokenizers import AddedToken, processors

    names = [tok.id_to_token(i) for i in (vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{names[0]} $A", pair=f"{names[0]} $A {names[0]} $B",
        special_tokens=[(names[0], vocab_lib.PAD_ID)])
    return names


def transformers_tokenizer(tok):
    """A `tokenizers.Tokenizer` in the run's layout as a transformers fast tokenizer: BOS
    and pad id 0, EOS 1, UNK 2, the special tokens never matched in text
    (`split_special_tokens`)."""
    import transformers

    start, eos, unk = mark_run_specials(tok)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=start, pad_token=start, eos_token=eos,
        unk_token=unk, split_special_tokens=True, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- modes.json
def modes_spec(policies: Sequence[str], token_class: np.ndarray) -> dict:
    """The content of `modes.json` for a model whose ids have classes `token_class`."""
    out = {"format": MODES_FORMAT, "version": MODES_VERSION, "modes": list(modes.MODES),
           "classes": list(modes.CLASSES),
           "grammar": {m: dict(moves) for m, moves in modes._GRAMMAR.items()},
           "never": list(sampling.NEVER_SAMPLED), "eos_id": vocab_lib.EOS_ID,
           "token_class": [int(c) for c in token_class], "policies": {}}
    for name in policies:
        policy = modes.get_policy(name)
        t = policy.compile()
        t.for_vocab(token_class, never=sampling.NEVER_SAMPLED)  # every state allows an id
        out["policies"][t.name] = {
            "transitions": list(policy.transitions), "states": list(t.states),
            "state_modes": [modes.MODES[m] for m in t.state_mode], "initial": t.initial,
            "delta": t.delta.tolist()}
    return out


class ModeTables:
    """A policy read from `modes.json`: its PolicyTables and the VocabTables the sampler
    would build (`sampling.mask_tables`), computed by the same `for_vocab`."""

    def __init__(self, spec: Mapping, policy: str, where: str = MODES_FILE):
        if spec.get("format") != MODES_FORMAT or spec.get("version") != MODES_VERSION:
            raise HFError(f"{where}: not a {MODES_FORMAT} v{MODES_VERSION} file (format "
                          f"{spec.get('format')!r}, version {spec.get('version')!r}); "
                          "re-export with this prealign-jax")
        if policy not in spec["policies"]:
            raise HFError(f"{where}: no policy {policy!r}; exported: "
                          f"{sorted(spec['policies'])} (prealign export --policies)")
        p = spec["policies"][policy]
        self.policy = modes.PolicyTables(
            name=policy, states=tuple(p["states"]),
            state_mode=np.array([modes.MODES.index(m) for m in p["state_modes"]], np.int32),
            delta=np.array(p["delta"], np.int32), initial=int(p["initial"]))
        self.token_class = np.array(spec["token_class"], np.int32)
        self.never = tuple(spec["never"])
        self.eos_id = int(spec["eos_id"])
        self.vocab = self.policy.for_vocab(self.token_class, never=self.never)

    @classmethod
    def load(cls, path: str, policy: str) -> "ModeTables":
        """From `modes.json` or a directory holding it."""
        if os.path.isdir(path):
            path = os.path.join(path, MODES_FILE)
        try:
            with open(path) as f:
                spec = json.load(f)
        except FileNotFoundError:
            raise HFError(f"{path} does not exist; export the run with prealign export") from None
        return cls(spec, policy, where=path)

    def state_index(self, state: int | str) -> int:
        if isinstance(state, str):
            if state not in self.policy.states:
                raise HFError(f"policy {self.policy.name!r} has no state {state!r}; its "
                              f"states: {list(self.policy.states)}")
            return self.policy.states.index(state)
        return int(state)

    def prompt_state(self, ids: Iterable[int]) -> int:
        """The state after a prompt's ids read from the initial state (pad ids, such as the
        leading document start, skipped); the invalid state if the policy forbids them."""
        state = self.policy.initial
        for i in ids:
            if self.token_class[i] != modes.PAD_CLASS:
                state = int(self.vocab.next_state[state, i])
        return state


# ---------------------------------------------------------------- the mask in transformers
def mode_logits_processor(tables: ModeTables, start_states: Sequence[int | str] | None = None):
    """A `transformers.LogitsProcessor` applying `tables`' policy to `model.generate`.

    Each row's state starts at `start_states[row]` (a state name or index: where the
    prompt leaves the policy's document, e.g. "ai" after `...<ai>`), or else is read from
    the prompt's ids by the policy (`ModeTables.prompt_state`); a prompt the policy
    forbids is refused: give its start state. Then every new token advances the row (pad,
    the filler of finished rows, does not). Scores are masked as `sampling_logits` masks
    (a forbidden, NaN or padding id gets -inf; pad and unk never), before any temperature,
    top-k or top-p warper, as in the JAX sampler. A new `generate` call (a prompt length
    other than the last one plus one) starts again from the prompts.
    """
    return _processor_class()(tables, start_states)


@functools.cache
def _processor_class():
    require("torch", "transformers")
    import torch
    import transformers

    class ModeLogitsProcessor(transformers.LogitsProcessor):
        def __init__(self, tables: ModeTables, start_states):
            self.tables = tables
            self.allowed = torch.from_numpy(tables.vocab.allowed)
            self.next_state = torch.from_numpy(tables.vocab.next_state.astype(np.int64))
            self.start = (None if start_states is None
                          else torch.tensor([tables.state_index(s) for s in start_states]))
            self.state, self.length = None, -1
            self.pad_class = torch.from_numpy(tables.token_class == modes.PAD_CLASS)

        def __call__(self, input_ids, scores):
            rows, length = input_ids.shape
            if self.state is None or length != self.length + 1 or len(self.state) != rows:
                self.state = self._prompt_states(input_ids)
            else:
                last = input_ids[:, -1]
                self.state = torch.where(self.pad_class[last], self.state,
                                         self.next_state[self.state, last])
            self.length = length
            return masked_scores(scores, self.allowed[self.state].to(scores.device))

        def _prompt_states(self, input_ids):
            if self.start is not None:
                if len(self.start) != len(input_ids):
                    raise HFError(f"start_states has {len(self.start)} entries for a batch "
                                  f"of {len(input_ids)} prompts; give one per row")
                return self.start.clone()
            states = [self.tables.prompt_state(row) for row in input_ids.tolist()]
            invalid = self.tables.policy.num_states
            if invalid in states:
                row = states.index(invalid)
                raise HFError(f"prompt row {row} breaks policy {self.tables.policy.name!r}; "
                              "pass start_states (the state the policy's document begins "
                              "in, e.g. 'ai' after <ai>)")
            return torch.tensor(states)

    return ModeLogitsProcessor


def masked_scores(scores, allowed):
    """`sampling.sampling_logits` before its filters, in torch: -inf exactly where
    `allowed` is False or the score is NaN; +inf allowed scores share the mass, a row with
    no finite allowed score is uniform over its allowed ids; the maximum shifted to 0."""
    import torch

    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=scores.device)
    x = torch.where(allowed & ~torch.isnan(scores), scores.float(), neg_inf)
    certain = x == float("inf")
    x = torch.where(certain.any(-1, keepdim=True), torch.where(certain, 0.0, neg_inf), x)
    top = x.max(dim=-1, keepdim=True).values
    return torch.where(top == neg_inf, torch.where(allowed, 0.0, neg_inf), x - top)


# ---------------------------------------------------------------- vLLM grammar
def lark_grammar(tables: ModeTables, start: int | str) -> str:
    """The policy from state `start` on, as an llguidance lark grammar over token ids
    (`<[a-b]>` ranges), for vLLM's structured outputs (backend guidance): the allowed
    tokens in each state are exactly `tables.vocab.allowed[state]`, EOS included where the
    policy may end (llguidance allows EOS where the grammar accepts)."""
    t, cls = tables.policy, tables.token_class
    start = tables.state_index(start)
    ids = lambda c: [i for i in np.flatnonzero(cls == c) if i not in tables.never]
    terminals = {c: _token_ranges(ids(c)) for c in range(modes.NUM_CLASSES)
                 if c not in (modes.EOS_CLASS, modes.PAD_CLASS) and ids(c)}
    names = {s: f"s{s}_{re.sub(r'[^a-z0-9]', '_', name.lower())}"
             for s, name in enumerate(t.states)}
    lines = [f"// policy {t.name!r} from state {t.states[start]!r}; prealign-jax export",
             f"start: {names[start]}"]
    for s in sorted(modes._reachable(t.delta, start)):
        loop = "text* " if modes.TEXT in terminals and t.delta[s, modes.TEXT] == s else ""
        alts = [f"{terminals[c] if c != modes.TEXT else 'text'} {names[int(t.delta[s, c])]}"
                for c in terminals if t.delta[s, c] >= 0 and not (c == modes.TEXT and loop)]
        if t.delta[s, modes.EOS_CLASS] >= 0:
            alts.append('""')
        lines.append(f"{names[s]}: {loop}({' | '.join(alts)})" if alts
                     else f"{names[s]}: {loop.strip()}")
    if modes.TEXT in terminals:
        lines.append(f"text: {terminals[modes.TEXT]}")
    return "\n".join(lines) + "\n"


def _token_ranges(ids: Sequence[int]) -> str:
    """`<[3]> | <[10-20]>`: token-id terminals covering `ids` (sorted)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [f"<[{a}]>" if a == b else f"<[{a}-{b}]>" for a, b in runs]
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


# ---------------------------------------------------------------- export
def check_export_args(out_dir: str, dtype: str, policies: Sequence[str],
                      max_shard_size: str | int) -> None:
    """Refuse what `export_run` would refuse, before anything is loaded or written."""
    if dtype not in DTYPES:
        raise HFError(f"--dtype={dtype}: choose one of {DTYPES}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"--out={out_dir} is a file; choose a directory path")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise HFError(f"--out={out_dir} exists and is not empty; choose a new directory or "
                      "remove it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise HFError(f"--out={out_dir}: the directory {parent} does not exist")
    for name in policies:
        try:
            modes.get_policy(name)
        except modes.PolicyError as e:
            raise HFError(f"--policies: {e}") from None
    parse_size(max_shard_size)


def export_run(run, out_dir: str, *, dtype: str = "float32",
               policies: Sequence[str] = DEFAULT_POLICIES,
               max_shard_size: str | int = "5GB",
               lm_eval_documents: Sequence[Any] = ()) -> list[str]:
    """Write `run` (an `inference.Run`) as a Hugging Face directory at `out_dir`, which
    must not exist or be empty, with lm-eval tasks over `lm_eval_documents` (held-out
    `records.Document`s) in `lm_eval/`. Everything is written to a sibling temporary
    directory, renamed into place at the end. Returns the files written."""
    require("torch", "transformers", "safetensors", "tokenizers")
    import transformers

    check_export_args(out_dir, dtype, policies, max_shard_size)
    token_class = vocab_lib.model_token_classes(vocab_lib.token_classes(run.vocab),
                                                run.model_cfg.vocab_size)
    spec = modes_spec(policies, token_class)
    tokenizer = hf_tokenizer(run.vocab)
    tokenizer.model_max_length = run.model_cfg.max_len
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        llama_config(run.model_cfg, dtype).save_pretrained(tmp)
        transformers.GenerationConfig(
            bos_token_id=vocab_lib.PAD_ID, eos_token_id=vocab_lib.EOS_ID,
            pad_token_id=vocab_lib.PAD_ID).save_pretrained(tmp)
        write_safetensors(hf_state_dict(run.params, run.model_cfg), tmp, dtype,
                          parse_size(max_shard_size))
        tokenizer.save_pretrained(tmp)
        if not isinstance(run.vocab, vocab_lib.TokenizerVocabulary):
            shutil.copyfile(run.vocab.sentencepiece_model_file,
                            os.path.join(tmp, SP_MODEL_FILE))
        with open(os.path.join(tmp, MODES_FILE), "w") as f:
            json.dump(spec, f)
        os.makedirs(os.path.join(tmp, GRAMMAR_DIR))
        for name in spec["policies"]:
            tables = ModeTables(spec, name)
            for s in modes.reachable_states(tables.policy):
                state = tables.policy.states[s]
                with open(os.path.join(tmp, GRAMMAR_DIR, f"{name}.{state}.lark"), "w") as f:
                    f.write(lark_grammar(tables, s))
        if lm_eval_documents:
            lm_eval_tasks.write_tasks(lm_eval_documents, os.path.join(tmp, LM_EVAL_DIR),
                                      final_dir=os.path.join(os.path.abspath(out_dir),
                                                             LM_EVAL_DIR))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # (empty: checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.path.relpath(os.path.join(d, f), out_dir)
                  for d, _, files in os.walk(out_dir) for f in files)
