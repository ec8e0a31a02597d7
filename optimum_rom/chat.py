"""Chat conversations: reading them, rendering them with the tokenizer's chat template, answering prompts.

A conversation is a list of ``{"role", "content"}`` messages, as ``apply_chat_template`` takes it.
Rendered, it becomes token ids and a mask of the tokens the assistant wrote (its content and its
end-of-turn marker): what calibration, healing and the chat evaluation care about. Few chat
templates mark assistant turns (``{% generation %}``), so the mask comes from rendering the
conversation turn by turn and mapping the assistant spans of the text onto the tokens' offsets.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .generation import generate_tokens
from .jsonl import read_jsonl

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
RECORD_HINT = (
    'a chat file holds one conversation per line: {"messages": [{"role": "user", "content": ...}, '
    '{"role": "assistant", "content": ...}]} or {"prompt": ..., "response": ...}'
)


@dataclass(frozen=True)
class RenderedConversation:
    """Token ids of a conversation and, per token, whether the assistant wrote it."""

    ids: list[int]
    assistant: list[bool]


def is_chat_file(path: str | Path) -> bool:
    """Whether a jsonl file holds chat records (its first record has ``messages``, or ``prompt`` and
    ``response``), so that ``calibration="chats.jsonl"`` needs no flag."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        return False
    first = next(iter(read_jsonl(path)), {})
    return "messages" in first or {"prompt", "response"} <= set(first)


def read_conversations(path: str | Path, need_answer: bool = True) -> list[Conversation]:
    """The conversations of a chat jsonl file; with ``need_answer`` each must contain an assistant turn.

    Records are ``{"messages": [...]}`` or ``{"prompt": ..., "response": ...}`` (a prompts file for
    self-calibration or the chat evaluation may give ``prompt`` alone, or messages ending with the
    user's turn). Every mistake names the file and line.
    """
    conversations = []
    for number, record in enumerate(read_jsonl(path), 1):
        where = f"{path}: record {number}"
        if "messages" in record:
            conversation = record["messages"]
        elif "prompt" in record:
            conversation = [{"role": "user", "content": record["prompt"]}]
            if "response" in record:
                conversation.append({"role": "assistant", "content": record["response"]})
        else:
            raise ValueError(
                f"{where} has neither 'messages' nor 'prompt' (its fields: {sorted(record)}); {RECORD_HINT}"
            )
        check_conversation(conversation, where, need_answer)
        conversations.append(conversation)
    if not conversations:
        raise ValueError(f"chat file {path} is empty")
    return conversations


def check_conversation(conversation: object, where: str, need_answer: bool) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}; {RECORD_HINT}")
    for message in conversation:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: every message needs a role among {ROLES}, got {message!r:.80}")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise ValueError(f"{where}: a {message['role']} message has no text content")
    if need_answer and not any(m["role"] == "assistant" for m in conversation):
        raise ValueError(f"{where} has no assistant turn: nothing to calibrate the answers on; {RECORD_HINT}")
    if not need_answer and conversation[-1]["role"] != "user":
        raise ValueError(f"{where}: a prompt must end with the user's turn, got {conversation[-1]['role']!r}")


def check_chat_template(tokenizer, why: str = "chat data") -> None:
    """Chat data needs a tokenizer that knows how to render a conversation."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{why} is rendered with the tokenizer's chat template, and this model's tokenizer has none; "
            "give plain text calibration instead (a .txt file, or a jsonl with --text-field)"
        )


def render(tokenizer, conversation: Conversation) -> RenderedConversation:
    """Token ids of ``conversation`` under the chat template, with the assistant's tokens marked."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            conversation[:index], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(conversation[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template does not render a conversation as the concatenation of its turns, so the "
                "assistant's tokens cannot be located; give plain text calibration instead"
            )
        spans.append((len(before), len(through)))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "chat data needs a fast (Rust) tokenizer, whose offsets locate the assistant's tokens"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assistant = [
        any(start <= offset < end for start, end in spans) for offset, _ in encoded["offset_mapping"]
    ]
    return RenderedConversation(list(encoded["input_ids"]), assistant)


def prompt_ids(tokenizer, conversation: Conversation) -> list[int]:
    """The tokens that ask the model for the next assistant turn."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class AnswerSettings:
    """How answers are generated: part of every cache key."""

    max_new_tokens: int = 256
    sample: bool = False
    seed: int = 0
    batch_size: int = 64  # decode is bound by reading the weights: a wide batch is nearly free


class Answerer:
    """A model that answers prompts, loaded only if its answers are not cached yet.

    ``identity`` names the weights (see :func:`weights_identity` / :func:`files_identity`), so
    answers are generated once per model, prompt set and :class:`AnswerSettings`.
    """

    def __init__(self, identity: str, load) -> None:
        self.identity = identity
        self._load = load
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model


def cached_answers(
    answerer: Answerer,
    tokenizer,
    prompts: Sequence[Conversation],
    settings: AnswerSettings,
    desc: str = "answers",
    progress: bool = True,
) -> list[RenderedConversation]:
    """:func:`answer` for every prompt, generating only those not cached yet.

    The cache holds one file per model and settings, one line per answered prompt (keyed by the
    prompt as the template renders it), so a run that needs more prompts than an earlier one
    answers only the new ones. Lines are appended batch by batch: an interrupted generation keeps
    the answers it finished (a torn last line is ignored and answered again).
    """
    from .model_sources import cache_root

    key = json.dumps([answerer.identity, asdict(settings)], sort_keys=True)
    path = cache_root() / "answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.jsonl"
    asked = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    keys = [hashlib.sha256(json.dumps(ids).encode()).hexdigest() for ids in asked]
    cache = _read_cache(path)
    missing = sorted(
        {k: i for i, k in enumerate(keys) if k not in cache}.values(), key=lambda i: len(asked[i])
    )
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = [
            missing[start : start + settings.batch_size]
            for start in range(0, len(missing), settings.batch_size)
        ]
        for number, chunk in enumerate(tqdm(chunks, desc=desc, unit="batch", disable=not progress)):
            replies = generate_tokens(
                answerer.model,
                tokenizer,
                [asked[i] for i in chunk],
                settings.max_new_tokens,
                settings.batch_size,
                sample=settings.sample,
                seed=settings.seed * 7919 + number,  # each batch its own draw when sampling
                progress=False,
            )
            lines = "".join(
                json.dumps({"prompt": keys[i], "answer": r}) + "\n"
                for i, r in zip(chunk, replies, strict=True)
            )
            with path.open("a") as cache_file:  # one write per batch, appended whole
                if cache_file.tell() and not _ends_a_line(path):  # after a torn write: a line of its own
                    lines = "\n" + lines
                cache_file.write(lines)
            cache.update({keys[i]: reply for i, reply in zip(chunk, replies, strict=True)})
    return [
        RenderedConversation(question + cache[k], [False] * len(question) + [True] * len(cache[k]))
        for question, k in zip(asked, keys, strict=True)
    ]


def _read_cache(path: Path) -> dict[str, list[int]]:
    cache: dict[str, list[int]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the torn end of an interrupted write
                continue
            cache[record["prompt"]] = record["answer"]
    return cache


def _ends_a_line(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def weights_identity(model) -> str:
    """A digest of a model's architecture and weights (bytes of every parameter and buffer; of the
    graph files for an onnxruntime model)."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    if not isinstance(model, torch.nn.Module):
        graph = Path(model.path)
        for file in sorted(graph.parent.glob(f"{graph.name}*")):  # model.onnx and its external data
            digest.update(file.read_bytes())
        return digest.hexdigest()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_identity(source: str | Path) -> str:
    """A digest of a model's weight files, a directory's or one ``.gguf`` (resolved path, names,
    sizes, modification times)."""
    source = Path(source).resolve()
    if source.is_file():
        files = [source]
    else:
        files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps([str(source), stats]).encode()).hexdigest()
