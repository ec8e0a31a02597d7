"""Greedy generation for the text-prompted tasks (GSM8K, HumanEval): cut at stop strings."""

from __future__ import annotations

from ..generation import generate_tokens


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
    """The greedy continuation of each prompt, cut before the first stop string."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    generated = generate_tokens(
        model, tokenizer, encoded, max_new_tokens, batch_size, stop_strings=stop, desc=desc, progress=progress
    )
    return [cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop) for tokens in generated]


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]
