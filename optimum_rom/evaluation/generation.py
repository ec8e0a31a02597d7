"""Greedy generation for the generative tasks (GSM8K, HumanEval): batched, cut at stop strings."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    stop: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """The greedy continuation of each prompt, cut before the first stop string.

    Prompts of similar length are batched together (left-padded); a batch ends when every
    row has produced a stop string or ``max_new_tokens`` tokens.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            tokens = encoded[index]
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
            attention_mask[row, width - len(tokens) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_token_id,
                stop_strings=stop or None,
                tokenizer=tokenizer,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        for row, index in enumerate(batch):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            outputs[index] = cut_at_stop(text, stop)
    model.train(was_training)
    return outputs


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]
