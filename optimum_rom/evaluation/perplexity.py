"""Perplexity on a raw text file (WikiText-2 by default), in non-overlapping windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Characters of text to tokenize per needed token; generous so the first windows are always filled.
_CHARS_PER_TOKEN = 8


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def text_perplexity(
    model,
    tokenizer,
    path: str | Path,
    seq_len: int = 512,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on the text file at ``path`` (e.g. WikiText-2 raw ``wiki.test.raw``).

    The file is tokenized as one stream and cut into ``seq_len``-token windows, the first
    ``max_windows`` of which are scored (every token after the first of each window).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text not found: {path}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive, got {max_windows}")
    text = path.read_text(encoding="utf-8")
    ids = _tokenize_prefix(tokenizer, text, seq_len * max_windows if max_windows else None)
    windows = len(ids) // seq_len
    if max_windows:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return stream_perplexity(model, ids[: windows * seq_len].view(windows, seq_len), progress=progress)


def stream_perplexity(model, windows: torch.Tensor, progress: bool = True) -> PerplexityResult:
    """Perplexity over pre-cut token windows ``(windows, seq_len)``.

    ``model`` is a torch causal LM or an ``optimum.onnxruntime.ORTModelForCausalLM`` (same call,
    same logits; ONNX models need the explicit attention mask and have no ``parameters()``).
    """
    device = model.device
    total_nll, total_tokens = 0.0, 0
    started = time.perf_counter()
    with torch.no_grad():
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            window = window.unsqueeze(0).to(device)
            mask = torch.ones_like(window)
            logits = model(input_ids=window, attention_mask=mask, use_cache=False).logits[0, :-1].float()
            total_nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            total_tokens += window.shape[1] - 1
    nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=total_tokens,
        windows=windows.shape[0],
        seq_len=windows.shape[1],
        seconds=time.perf_counter() - started,
    )


def _tokenize_prefix(tokenizer, text: str, needed_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text``, tokenizing only a prefix when a few windows are all that is needed."""
    if needed_tokens is not None:
        ids = tokenizer(text[: needed_tokens * _CHARS_PER_TOKEN], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        if len(ids) >= needed_tokens:
            return torch.tensor(ids, dtype=torch.long)
    return torch.tensor(
        tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
    )
