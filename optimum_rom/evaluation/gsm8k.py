"""GSM8K: few-shot prompting, greedy generation, exact match on the final number.

Prompts follow lm-evaluation-harness's ``gsm8k`` task ("Question: ...\\nAnswer: ..." exemplars,
stop at "Question:"), and so does the scoring: ``strict`` reads the number after "####",
``flexible`` the last number in the output; both compare it to the reference's "####" number
with commas, "$" and a trailing "." removed.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

from ..jsonl import read_jsonl
from .generation import greedy_generate

STOP = ["Question:", "</s>", "<|im_end|>"]
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def read_problems(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """``{question, answer}`` records of a GSM8K jsonl file (the answer ends with ``#### <number>``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}")
    problems = []
    for number, record in enumerate(read_jsonl(path, ("question", "answer")), 1):
        if "####" not in str(record["answer"]):
            raise ValueError(
                f"{path}: record {number} is not a GSM8K record (its answer has no '#### <number>')"
            )
        problems.append({"question": record["question"], "answer": record["answer"]})
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"GSM8K file {path} is empty")
    return problems


def normalize_number(text: str) -> str:
    """The harness's normalization before exact match: no commas, no "$", no trailing "."."""
    return re.sub(r"\.$", "", text.strip().replace(",", "").replace("$", ""))


def reference_answer(answer: str) -> str:
    return normalize_number(answer.split("####")[-1])


def extract_strict(output: str) -> str | None:
    """The number after the first "#### " (the format the exemplars teach), or ``None``."""
    match = _STRICT.search(output)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(output: str) -> str | None:
    """The last number in the output, or ``None``."""
    matches = [m.group(0) for m in _FLEXIBLE.finditer(output)]
    return normalize_number(matches[-1]) if matches else None


def few_shot_prefix(exemplars: list[dict[str, str]]) -> str:
    return "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in exemplars)


def evaluate_gsm8k(
    model,
    tokenizer,
    test_path: str | Path,
    train_path: str | Path,
    limit: int | None = None,
    num_fewshot: int = 5,
    seed: int = 1234,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy on the first ``limit`` test problems, ``num_fewshot`` exemplars from ``train_path``.

    The exemplars are a seeded sample of the train file, the same for every question.
    """
    started = time.perf_counter()
    problems = read_problems(test_path, limit)
    train = read_problems(train_path)
    if num_fewshot > len(train):
        raise ValueError(f"num_fewshot={num_fewshot} but {train_path} has only {len(train)} problems")
    prefix = few_shot_prefix(random.Random(seed).sample(train, num_fewshot))
    prompts = [f"{prefix}Question: {p['question']}\nAnswer:" for p in problems]
    outputs = greedy_generate(
        model, tokenizer, prompts, STOP, max_new_tokens, batch_size, desc="gsm8k", progress=progress
    )
    references = [reference_answer(p["answer"]) for p in problems]
    strict = [extract_strict(o) == r for o, r in zip(outputs, references, strict=True)]
    flexible = [extract_flexible(o) == r for o, r in zip(outputs, references, strict=True)]
    return {
        "exact_match_strict": sum(strict) / len(problems),
        "exact_match_flexible": sum(flexible) / len(problems),
        "items": len(problems),
        "num_fewshot": num_fewshot,
        "seconds": time.perf_counter() - started,
    }
