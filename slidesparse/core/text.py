"""Text for calibration and evaluation: reading it, tokenizing it, cutting it into windows.

Calibrated pruning (convert/calibrate.py) and `slidesparse eval` (accuracy/) both turn a UTF-8
text into fixed-length token windows with the model's own tokenizer, in the same way:

* the whole text is tokenized once, without special tokens (no BOS is inserted: the first token
  of a window is context, never scored);
* consecutive, non-overlapping windows of `length` tokens are cut from the start; a trailing
  partial window is dropped, so every window has exactly `length` tokens.

The default calibration text is CPython's own English documentation, `pydoc_data.topics` (the
language reference sections `help()` shows), which every CPython installation ships, so
calibration needs no download. Its topics are joined in sorted order, so the text does not
depend on dict order.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

from .errors import SlideSparseError

DEFAULT_TEXT = "pydoc_data.topics"


class TextError(SlideSparseError):
    """A text or tokenizer that cannot be used (missing, not UTF-8, too short)."""


@dataclass(frozen=True)
class Text:
    content: str
    name: str        # the file's name, or "pydoc_data.topics (CPython X.Y.Z)"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def load_text(path: str | Path | None) -> Text:
    """A UTF-8 text file, or (path None) CPython's pydoc_data.topics."""
    if path is None:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions split the docs out of the standard library
            raise TextError("this Python has no pydoc_data.topics (the default calibration text): "
                            "pass a UTF-8 text file with --calib") from None
        return Text("\n\n".join(topics[k] for k in sorted(topics)),
                    f"{DEFAULT_TEXT} (CPython {platform.python_version()})")
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise TextError(f"{p}: no such file") from None
    except OSError as e:
        raise TextError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not content.strip():
        raise TextError(f"{p}: the text is empty")
    return Text(content, p.name)


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer as a function text -> token ids (no special tokens added).

    tokenizer.json is read with `tokenizers` directly (fast, no length warnings); other
    tokenizers (sentencepiece tokenizer.model, vocab.json + merges.txt) through transformers."""
    d = Path(model_dir)
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
            raise TextError(f"{d / 'tokenizer.json'}: cannot load the tokenizer ({e})") from None
        tok.no_truncation()
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    if not any((d / f).is_file() for f in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise TextError(f"{d}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json) to read the text with")
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
        raise TextError(f"{d}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    tok.model_max_length = 1 << 62  # the text is cut into windows afterwards
    return lambda text: list(tok(text, add_special_tokens=False)["input_ids"])


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of exactly `length` tokens (a trailing rest is dropped)."""
    if length < 2:
        raise TextError(f"a window must have at least 2 tokens, got {length}")
    return [ids[i: i + length] for i in range(0, len(ids) - length + 1, length)]


def spread(items: list, count: int, what: str) -> list:
    """`count` of the items, evenly spaced over the whole list (all of them if count == len)."""
    if count < 1:
        raise TextError(f"{what}: need at least 1, got {count}")
    if count > len(items):
        raise TextError(f"{what}: the text gives only {len(items)}, {count} asked for "
                        "(use a longer text, or fewer or shorter samples)")
    return [items[i * len(items) // count] for i in range(count)]


def describe(text: Text, **settings) -> dict:
    """What a result computed on `text` records about it."""
    return {"text": text.name, "sha256": text.sha256, "chars": len(text.content), **settings}
