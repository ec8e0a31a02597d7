"""Target-task loss: mean cross-entropy of a model on the answer tokens of prompt/answer pairs.

Cheap and stable on small models where task accuracy is near zero for every variant, which is
what the application-specific pass is judged by.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..task_data import PromptAnswer, answer_nll, collate, tokenize_pairs


@dataclass
class TaskLossResult:
    loss: float  # mean negative log-likelihood per answer token (nats)
    perplexity: float
    answer_tokens: int
    examples: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def answer_loss(
    model,
    tokenizer,
    pairs: list[PromptAnswer],
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> TaskLossResult:
    """Mean cross-entropy over all answer tokens of ``pairs`` (prompt tokens are context only)."""
    examples = tokenize_pairs(tokenizer, pairs, max_length)
    if not examples:
        raise ValueError("no pair has an answer token left after truncation; raise max_length")
    # Similar lengths together: less padding, same result.
    examples.sort(key=lambda e: len(e["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batches = range(0, len(examples), batch_size)
        for start in tqdm(batches, desc="answer loss", unit="batch", disable=not progress):
            nll, count = answer_nll(model, collate(examples[start : start + batch_size], pad))
            total += nll.item()
            tokens += count
    model.train(was_training)
    loss = total / tokens
    return TaskLossResult(loss, math.exp(loss), tokens, len(examples), time.perf_counter() - started)
