"""Batched generation from token ids: what evaluation (GSM8K, HumanEval, chat) and self-calibration share.

Prompts of similar length are batched together and left-padded. On a CPU the decode step of a
small model is bound by reading the weights, so a wide batch costs little more per step than a
narrow one: the batch is the main lever on generation speed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's ``eos_token_id`` (the model's own
    end-of-turn marker for chat models), else the tokenizer's eos token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {configured} if isinstance(configured, int) else set(configured)


@contextmanager
def evaluating(model):
    """``model.eval()`` for the duration, its training flag restored after (onnxruntime models,
    which are not ``nn.Module`` s, have neither and pass through)."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def generate_tokens(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    stop_strings: list[str] | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt (token ids), up to and including the first end-of-turn token.

    Greedy unless ``sample`` (nucleus sampling at ``temperature`` / ``top_p``, seeded per batch, so a
    rerun draws the same answers). A row stops at an end-of-turn token, a stop string or
    ``max_new_tokens``.
    """
    stops = end_of_turn_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(stops) if stops else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with evaluating(model):
        for number, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                tokens = prompts[index]
                input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
                attention_mask[row, width - len(tokens) :] = 1
            if sample:
                torch.manual_seed(seed * 1_000_003 + number)
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    num_beams=1,
                    pad_token_id=pad,
                    stop_strings=stop_strings or None,
                    tokenizer=tokenizer if stop_strings else None,
                    **(sampling if sample else greedy),
                )
            for row, index in enumerate(batch):
                outputs[index] = _until_stop(generated[row, width:].tolist(), stops)
    return outputs


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1]
    return tokens
