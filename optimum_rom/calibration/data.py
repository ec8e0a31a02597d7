"""Calibration samples: fixed-length token windows drawn, with a seed, from the user's data.

Plain text (a text file, a jsonl file with one or more fields per record, a list of strings) is
tokenized as one stream and ``num_samples`` windows of ``seq_len`` tokens are drawn at seeded
random offsets (the GPTQ / SVD-LLM convention). Already-tokenized ids are taken as they are.

Chat data (:class:`ChatCalibration`: a chat jsonl, or the dense model's own answers to a prompt
set) is rendered with the tokenizer's chat template, and every window starts where a conversation
starts, so no sample opens in the middle of a turn; a conversation shorter than a window is
followed by the next one. Its windows can be mixed with plain-text windows (``text_share``).
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..chat import (
    Answerer,
    AnswerSettings,
    Conversation,
    RenderedConversation,
    cached_answers,
    check_chat_template,
    check_conversation,
    is_chat_file,
    read_conversations,
    render,
)
from ..jsonl import read_jsonl

BUNDLED = Path(str(resources.files("optimum_rom") / "data"))  # the package data folder, installed with it
BUNDLED_TEXT = BUNDLED / "wikitext2_valid_excerpt.txt"
BUNDLED_PROMPTS = BUNDLED / "chat_prompts_calibration.jsonl"

# Reading a multi-GB corpus to draw a few hundred windows is wasteful: keep about forty times
# the text the windows need (at ~4 characters per token), and never less than 2 MB.
_CHARS_PER_TOKEN_MARGIN = 160
_MIN_CHARS = 2_000_000


@dataclass
class CalibrationSet:
    """Calibration windows and which of their tokens are targets of the next-token loss.

    ``loss_mask[i, t]`` says whether token ``t`` of window ``i`` is one the model should predict
    well (chat data: what the assistant wrote); ``None`` means every token. The gradient pass of
    adaptive allocation and healing use it; the statistics see every token.
    """

    input_ids: torch.Tensor  # (samples, seq_len), long
    loss_mask: torch.Tensor | None = None  # (samples, seq_len), bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def labels(self) -> torch.Tensor:
        """``input_ids`` with the non-target tokens set to -100 (ignored by transformers' loss)."""
        if self.loss_mask is None:
            return self.input_ids
        return self.input_ids.masked_fill(~self.loss_mask, -100)

    def rows(self, index: slice | torch.Tensor) -> CalibrationSet:
        mask = None if self.loss_mask is None else self.loss_mask[index]
        return CalibrationSet(self.input_ids[index], mask)


@dataclass
class ChatCalibration:
    """Calibrate on conversations, as the model will be used: rendered with its chat template.

    Args:
        conversations: a chat jsonl (``{"messages": [...]}`` or ``{"prompt", "response"}`` records)
            or a list of conversations. ``None`` (self-calibration): the dense model answers
            ``prompts``, and its own transcripts are the data; the answers are cached per model.
        prompts: for self-calibration, a jsonl of prompts (``messages`` ending with the user's turn,
            or ``prompt``) or a list of conversations; ``None``: the bundled set (instructions,
            questions, math, code, summarization; see ``optimum_rom/data/README.md``).
        text: plain text mixed in (a calibration source as for text calibration); ``None``: the
            bundled WikiText-2 excerpt.
        text_share: the share of the windows that are plain text. Chat alone keeps what the
            assistant's turns need and loses general text; the mix keeps both.
        max_new_tokens / sample: how the dense model answers (greedy, or nucleus sampling).
    """

    conversations: str | Path | Sequence[Conversation] | None = None
    prompts: str | Path | Sequence[Conversation] | None = None
    text: str | Path | Sequence[str] | None = None
    text_share: float = 0.5
    max_new_tokens: int = 256
    sample: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.text_share, (int, float)) or not 0 <= self.text_share < 1:
            raise ValueError(
                f"text_share must be in [0, 1) (the share of plain-text windows among the chat ones), got {self.text_share!r}"
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")

    def describe(self) -> str:
        if self.conversations is None:
            prompts = "bundled prompts" if self.prompts is None else _name(self.prompts)
            what = f"self-generated answers to {prompts} ({'sampled' if self.sample else 'greedy'}, up to {self.max_new_tokens} tokens)"
        else:
            what = f"chat {_name(self.conversations)}"
        if not self.text_share:
            return what
        text = "bundled WikiText-2 excerpt" if self.text is None else _name(self.text)
        return f"{what} + {self.text_share:.0%} {text}"


CalibrationSource = str | Path | Sequence[str] | torch.Tensor | ChatCalibration


def as_chat_calibration(source: CalibrationSource | None, chat: bool = False) -> ChatCalibration | None:
    """The chat calibration a source stands for, or ``None`` for plain text.

    ``"self"`` is self-calibration; a jsonl file of chat records is detected by its first record
    (``chat=True`` insists, and reports a file that is not one).
    """
    if isinstance(source, ChatCalibration):
        return source
    if isinstance(source, str) and source == "self":
        return ChatCalibration()
    if isinstance(source, (str, Path)) and Path(source).is_file() and (chat or is_chat_file(source)):
        return ChatCalibration(conversations=source, text_share=0.0)
    if chat:
        raise ValueError(f"chat calibration needs a jsonl file of conversations or 'self', got {source!r}")
    return None


def load_calibration(
    source: CalibrationSource,
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    text_field: str = "text",
    answerer: Answerer | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """``num_samples`` windows of ``seq_len`` tokens for calibration (fewer if chat data runs out).

    ``text_field`` names the jsonl field(s) of plain text to read; several fields are joined with
    a newline (``"question,answer"``). Self-calibration needs the ``answerer`` (the dense model).
    """
    chat = as_chat_calibration(source)
    if chat is None:
        return CalibrationSet(text_windows(source, tokenizer, num_samples, seq_len, seed, text_field))
    check_chat_template(tokenizer, "chat calibration")
    wanted = num_samples - round(num_samples * chat.text_share)
    ids, mask = chat_windows(
        _conversations(chat, tokenizer, wanted, seq_len, seed, answerer, progress), wanted, seq_len, seed
    )
    if chat.text_share:
        text = BUNDLED_TEXT if chat.text is None else chat.text
        count = round(len(ids) * chat.text_share / (1 - chat.text_share))
        plain = text_windows(text, tokenizer, count, seq_len, seed, text_field)
        ids = torch.cat([ids, plain])
        mask = torch.cat([mask, torch.ones_like(plain, dtype=torch.bool)])
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))  # the mix in any prefix
    return CalibrationSet(ids[order], mask[order])


def _conversations(
    chat: ChatCalibration,
    tokenizer,
    windows: int,
    seq_len: int,
    seed: int,
    answerer: Answerer | None,
    progress: bool,
) -> list[RenderedConversation]:
    """The rendered conversations of a chat calibration; self-calibration answers only as many prompts
    as ``windows`` windows need (in a seeded order), so a short calibration costs a short generation."""
    if chat.conversations is not None:
        conversations = chat.conversations
        if isinstance(conversations, (str, Path)):
            conversations = read_conversations(conversations)
        for number, conversation in enumerate(conversations):
            check_conversation(conversation, f"conversation {number}", need_answer=True)
        return [render(tokenizer, c) for c in conversations]
    if answerer is None:
        raise ValueError(
            "self-calibration generates the dense model's answers: it needs the model (an Answerer)"
        )
    prompts = chat.prompts if chat.prompts is not None else BUNDLED_PROMPTS
    if isinstance(prompts, (str, Path)):
        prompts = read_conversations(prompts, need_answer=False)
    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    settings = AnswerSettings(chat.max_new_tokens, chat.sample, seed)
    count = min(len(prompts), windows)
    while True:
        answered = cached_answers(
            answerer, tokenizer, prompts[:count], settings, "self-calibration", progress
        )
        if count == len(prompts) or len(chat_windows(answered, windows, seq_len, seed)[0]) >= windows:
            return answered
        count = min(len(prompts), 2 * count)


def chat_windows(
    conversations: list[RenderedConversation], count: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` windows ``(ids, assistant mask)`` of ``seq_len`` tokens, each starting where a
    conversation starts; conversations are taken in a seeded order, a window that ends inside one
    cuts it there, and a short one is followed by the next."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    windows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    mask: list[bool] = []
    for index in order:
        if len(windows) == count:
            break
        ids += conversations[index].ids
        mask += conversations[index].assistant
        if len(ids) >= seq_len:
            windows.append((ids[:seq_len], mask[:seq_len]))
            ids, mask = [], []
    if not windows:
        longest = max(len(c.ids) for c in conversations)
        raise ValueError(
            f"the chat calibration has {sum(len(c.ids) for c in conversations)} tokens in all (the longest "
            f"conversation {longest}), fewer than one window of seq_len={seq_len}; give more conversations or a smaller seq_len"
        )
    if not any(any(m) for _, m in windows):
        raise ValueError(
            "no calibration window contains an assistant token: the conversations need assistant turns"
        )
    return torch.tensor([w[0] for w in windows]), torch.tensor([w[1] for w in windows])


def text_windows(
    source: str | Path | Sequence[str] | torch.Tensor,
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
) -> torch.Tensor:
    """Token ids of shape ``(num_samples, seq_len)`` drawn from plain text (or given as ids)."""
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
    chat = as_chat_calibration(source)
    if chat is not None:
        return chat.describe()
    if isinstance(source, (str, Path)):
        return Path(source).name
    if isinstance(source, torch.Tensor):
        return f"token ids {tuple(source.shape)}"
    return f"{len(source)} strings"


def _name(source: object) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name
    return f"{len(source)} conversations"
