"""The chat task: does the compressed model still answer the way the dense model does?

Perplexity and log-likelihood scores can stay respectable while an Instruct model stops chatting
(empty answers, loops). This task measures what the user sees, against the dense model's own
greedy answers to prompts no calibration saw (generated once and cached):

- ``answer_ce``: the cross-entropy of the dense model's answers under the model, teacher-forced,
  on the answer tokens only (nats per token); the dense model's own is the floor;
- ``token_agreement``: the share of those answer tokens that the model, teacher-forced, also
  ranks first;
- ``agreement``: the share of prompts whose first ``prefix_tokens`` greedy answer tokens equal the
  dense model's (all of them, end of turn included, when the dense answer is shorter);
- ``empty``: the share of greedy answers with no text (the end of turn at once);
- ``samples``: the first few prompts with both answers, side by side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..chat import (
    Answerer,
    AnswerSettings,
    Conversation,
    RenderedConversation,
    cached_answers,
    weights_identity,
)
from ..generation import evaluating
from ..task_data import IGNORE_INDEX, answer_logits, collate

PREFIX_TOKENS = 16


def evaluate_chat(
    model,
    tokenizer,
    prompts: Sequence[Conversation],
    reference: Answerer,
    max_new_tokens: int = 64,
    prefix_tokens: int = PREFIX_TOKENS,
    batch_size: int = 16,
    samples: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model``'s answers to ``prompts`` against those of ``reference`` (the dense model)."""
    started = time.perf_counter()
    settings = AnswerSettings(max_new_tokens=max_new_tokens)
    dense = cached_answers(reference, tokenizer, prompts, settings, "dense answers", progress)
    own = Answerer(weights_identity(model), lambda: model)
    answers = cached_answers(own, tokenizer, prompts, settings, "chat answers", progress)
    nll, matches, tokens = _teacher_forced(model, dense, batch_size, progress)
    dense_replies = [_reply(conversation) for conversation in dense]
    replies = [_reply(conversation) for conversation in answers]
    agree = [
        mine[:prefix_tokens] == theirs[:prefix_tokens]
        for mine, theirs in zip(replies, dense_replies, strict=True)
    ]
    texts = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
    dense_texts = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in dense_replies]
    return {
        "answer_ce": nll / tokens,
        "token_agreement": matches / tokens,
        "agreement": sum(agree) / len(prompts),
        "empty": sum(not text for text in texts) / len(prompts),
        "items": len(prompts),
        "answer_tokens": tokens,
        "prefix_tokens": prefix_tokens,
        "max_new_tokens": max_new_tokens,
        "samples": [
            {"prompt": prompts[i][-1]["content"], "dense": dense_texts[i], "model": texts[i]}
            for i in range(min(samples, len(prompts)))
        ],
        "seconds": time.perf_counter() - started,
    }


def _reply(conversation: RenderedConversation) -> list[int]:
    return [token for token, mine in zip(conversation.ids, conversation.assistant, strict=True) if mine]


def _teacher_forced(
    model, conversations: list[RenderedConversation], batch_size: int, progress: bool
) -> tuple[float, int, int]:
    """Summed cross-entropy and top-1 matches over the answer tokens, and their count."""
    examples = [
        {
            "input_ids": torch.tensor(c.ids),
            "labels": torch.tensor(
                [t if mine else IGNORE_INDEX for t, mine in zip(c.ids, c.assistant, strict=True)]
            ),
        }
        for c in conversations
    ]
    examples.sort(key=lambda e: len(e["input_ids"]))  # similar lengths together: less padding
    nll, matches, tokens = 0.0, 0, 0
    with evaluating(model), torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="chat answer loss", disable=not progress):
            logits, targets = answer_logits(model, collate(examples[start : start + batch_size]))
            scored = targets != IGNORE_INDEX
            nll += F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum").item()
            matches += int((logits[scored].argmax(-1) == targets[scored]).sum())
            tokens += int(scored.sum())
    return nll, matches, tokens
