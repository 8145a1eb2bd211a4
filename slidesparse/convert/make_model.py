"""`slidesparse make-model`: random-weight checkpoints with real shapes and a local tokenizer.

So that demos, tests and benchmarks need no downloads: config.json is what transformers and vLLM
expect for the architecture, the weights are random normal (std 0.02, norms 1), written tensor by
tensor (a 14B preset needs about one tensor of RAM, not the model), and tokenizer.json is a small
byte-level BPE with exactly vocab_size entries.

The tiny presets make the logits peaked (final norm scaled so the logit std is ~8), so greedy
decoding does not flip on rounding differences between a kernel and its reference, and give the
projections std 1/sqrt(K) (activations keep rms ~1), so the layers, not the embeddings, decide
the next token: a broken linear layer changes the generated text.
The presets' configs are core.presets'; the tensors each architecture has, core.layout's.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from ..core.layout import model_tensors
from ..core.presets import PRESETS
from .errors import ConvertError
from .writer import AtomicDir, Planned, ShardedWriter, write_model_files

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

TINY_LOGIT_STD = 8.0
STD = 0.02
# special tokens by model_type; Qwen2's tokenizer class insists on <|endoftext|> existing
SPECIALS = {"llama": ("<|begin_of_text|>", "<|end_of_text|>"), "bitnet": ("<|begin_of_text|>", "<|end_of_text|>"),
            "qwen2": ("<|im_start|>", "<|endoftext|>")}


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every weight, in HF order; init is 'normal', 'ones' or 'final_norm'."""
    def init(name: str, shape) -> str:
        if name == "model.norm.weight":
            return "final_norm"
        return "ones" if name.endswith("norm.weight") else "normal"
    return [(name, shape, init(name, shape)) for name, shape in model_tensors(cfg)]


def _generate(name: str, shape, init: str, dtype: torch.dtype, seed: int, final_norm: float,
              proj_std_fan_in: bool = False) -> torch.Tensor:
    if init == "ones":
        return torch.ones(shape, dtype=dtype)
    if init == "final_norm":
        return torch.full(shape, final_norm, dtype=dtype)
    # one generator per tensor, seeded by (seed, name): the values do not depend on write order
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = STD
    if proj_std_fan_in and len(shape) == 2 and not name.startswith(("model.embed_tokens", "lm_head")):
        std = 1.0 / math.sqrt(shape[1])
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    step = 1 << 24  # float32 scratch of 64 MB at most
    for s in range(0, flat.numel(), step):
        n = min(step, flat.numel() - s)
        flat[s: s + n] = torch.randn(n, generator=g).mul_(std)
    return out


def build_tokenizer(vocab_size: int, max_len: int, model_type: str = "llama"):
    """Byte-level BPE with exactly vocab_size ids: 256 bytes, a few merges, fillers, BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    BOS, EOS = SPECIALS[model_type]

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
              ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "o")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    n_fill = vocab_size - 2 - len(vocab)
    if n_fill < 0:
        raise ConvertError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (need >= {len(vocab) + 2})")
    for i in range(n_fill):
        vocab[f"<|filler_{i}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos), (EOS, eos)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                  "pad_token": EOS if model_type == "qwen2" else None, "model_max_length": max_len,
                  "clean_up_tokenization_spaces": False}
    if model_type == "qwen2":
        tok_config.update(tokenizer_class="Qwen2Tokenizer", unk_token=EOS)
    return tok, bos, eos, tok_config


def make_model(preset: str, out: str | Path, dtype: str = "bf16", seed: int = 0, overwrite: bool = False,
               max_shard_bytes: int = 4 * 1024**3, progress: bool = False) -> dict:
    """Write a random-weight `preset` model to `out`; returns a summary dict."""
    if preset not in PRESETS:
        raise ConvertError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if dtype not in WEIGHT_DTYPES:
        raise ConvertError(f"unknown --dtype {dtype!r} for make-model: choose bf16, fp16 or fp32")
    tdt = WEIGHT_DTYPES[dtype]
    cfg = dict(PRESETS[preset])
    tok, bos, eos, tok_config = build_tokenizer(cfg["vocab_size"], cfg["max_position_embeddings"],
                                                   cfg["model_type"])
    cfg.update(bos_token_id=bos, eos_token_id=eos, torch_dtype=TORCH_DTYPE_NAMES[dtype])
    plan = tensor_plan(cfg)
    final_norm = 1.0
    tiny = preset.startswith("tiny-")
    if tiny:
        # logits = rmsnorm(h) * g @ W^T with W ~ N(0, STD^2): std ~ g * STD * sqrt(hidden)
        final_norm = TINY_LOGIT_STD / (STD * math.sqrt(cfg["hidden_size"]))
    planned = [Planned(n, tdt, s) for n, s, _ in plan]
    total = sum(p.nbytes for p in planned)
    from tqdm import tqdm

    with AtomicDir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, planned, max_shard_bytes=max_shard_bytes, single_file=total <= max_shard_bytes)
        try:
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"make-model {preset}",
                      disable=not progress, dynamic_ncols=True) as bar:
                for (name, shape, init), p in zip(plan, planned):
                    writer.write(name, _generate(name, shape, init, tdt, seed, final_norm, tiny))
                    bar.update(p.nbytes)
            files = writer.close()
        finally:
            writer.abort()
        write_model_files(tmp, cfg, tok, tok_config, {k: tok_config[k] for k in ("bos_token", "eos_token")},
                          {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False})
    return {"preset": preset, "out": str(out), "dtype": dtype, "seed": seed, "bytes": total, "files": files,
            "parameters": sum(math.prod(s) for _, s, _ in plan)}
