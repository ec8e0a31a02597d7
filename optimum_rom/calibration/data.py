"""Calibration samples: fixed-length token windows drawn, with a seed, from the user's text.

Sources: a text file, a jsonl file (one or more fields per record), a list of strings, or
already-tokenized ids. The text is tokenized as one stream and ``num_samples`` windows of
``seq_len`` tokens are drawn at seeded random offsets (the GPTQ / SVD-LLM convention).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..jsonl import read_jsonl

CalibrationSource = str | Path | Sequence[str] | torch.Tensor

# Reading a multi-GB corpus to draw a few hundred windows is wasteful: keep about forty times
# the text the windows need (at ~4 characters per token), and never less than 2 MB.
_CHARS_PER_TOKEN_MARGIN = 160
_MIN_CHARS = 2_000_000


def load_calibration(
    source: CalibrationSource,
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    text_field: str = "text",
) -> torch.Tensor:
    """Token ids of shape ``(num_samples, seq_len)`` for calibration.

    ``text_field`` names the jsonl field(s) to read; several fields are joined with a newline
    (``"question,answer"``).
    """
    if isinstance(source, torch.Tensor):
        return _check_ids(source, num_samples, seq_len)
    max_chars = max(_MIN_CHARS, _CHARS_PER_TOKEN_MARGIN * num_samples * seq_len)
    if isinstance(source, (str, Path)):
        text = read_text_source(Path(source), text_field, max_chars)
    else:
        if not source or not any(s.strip() for s in source):
            raise ValueError("the calibration list of strings is empty")
        text = "\n\n".join(source)[:max_chars]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(
            f"the calibration text has only {len(ids)} tokens, fewer than seq_len={seq_len}; "
            "give more text or a smaller seq_len"
        )
    stream = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def read_text_source(path: Path, text_field: str = "text", max_chars: int | None = None) -> str:
    """The text of a plain text file, or the selected fields of a jsonl file, with clear errors."""
    if not path.exists():
        raise FileNotFoundError(f"calibration file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"calibration path {path} is a directory; give a .txt or .jsonl file")
    if path.suffix in (".jsonl", ".json"):
        text = _read_jsonl(path, text_field, max_chars)
    else:
        with path.open(encoding="utf-8", errors="replace") as handle:
            text = handle.read(max_chars if max_chars else -1)
        _check_text(path, text)
    if not text.strip():
        raise ValueError(f"calibration file {path} is empty")
    return text


# Characters that text does not contain: C0 controls other than tab, newlines and form feed.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
# Share of non-text characters (invalid UTF-8 or control) from which a file is refused as binary:
# executables and compressed files measure 55-65%, text files 0%.
BINARY_SHARE = 0.3


def _check_text(path: Path, text: str) -> None:
    """Refuse a binary file; warn about invalid UTF-8, which was replaced by U+FFFD."""
    replaced = text.count("\ufffd")
    share = (replaced + len(_CONTROL.findall(text))) / max(1, len(text))
    if share >= BINARY_SHARE:
        raise ValueError(
            f"calibration file {path} looks binary ({share:.0%} of its characters are not text); give a "
            "text file (.txt) or a .jsonl file (decompress .gz files first)"
        )
    if replaced:
        warnings.warn(
            f"calibration file {path}: {replaced / len(text):.2%} of its characters were not valid UTF-8 and "
            "were replaced; save it as UTF-8 to calibrate on the exact text",
            stacklevel=3,
        )


def _read_jsonl(path: Path, text_field: str, max_chars: int | None) -> str:
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    documents, size = [], 0
    for record in read_jsonl(path, tuple(fields), "Choose them with text_field (CLI: --text-field)"):
        document = "\n".join(str(record[f]) for f in fields)
        documents.append(document)
        size += len(document)
        if max_chars and size >= max_chars:
            break
    return "\n\n".join(documents)


def _check_ids(ids: torch.Tensor, num_samples: int, seq_len: int) -> torch.Tensor:
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"pre-tokenized calibration must be an integer tensor (samples, seq_len), got {ids.shape}"
        )
    if ids.shape[0] == 0:
        raise ValueError("the pre-tokenized calibration tensor is empty")
    return ids[:num_samples, :seq_len].long()


def describe_source(source: CalibrationSource) -> str:
    """A short provenance string stored in the config."""
    if isinstance(source, (str, Path)):
        return Path(source).name
    if isinstance(source, torch.Tensor):
        return f"token ids {tuple(source.shape)}"
    return f"{len(source)} strings"
