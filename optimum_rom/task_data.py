"""Target-application data: prompt/answer pairs, tokenized with the loss on the answer only.

Shared by the application-specific pass (Basis Selection trains on it) and the evaluation
(target-task loss is measured on it). Presets name the fields and the prompt template of
common sets; any jsonl (or jsonl.gz) of prompt/answer records works with explicit fields.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .jsonl import read_jsonl

IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class TaskFormat:
    """How a record becomes a prompt and an answer."""

    prompt_field: str
    answer_field: str
    prompt_template: str = "{prompt}"
    answer_template: str = "{answer}"


PRESETS = {
    # GSM8K: {question, answer}; the answer's worked solution ends with "#### <number>".
    "gsm8k": TaskFormat("question", "answer", "Question: {prompt}\nAnswer:", " {answer}"),
    # HumanEval-style code: the prompt is the signature + docstring, the answer the function body.
    "code": TaskFormat("prompt", "canonical_solution"),
}


@dataclass(frozen=True)
class PromptAnswer:
    prompt: str
    answer: str


def resolve_task_format(
    task: str | TaskFormat = "gsm8k", prompt_field: str | None = None, answer_field: str | None = None
) -> TaskFormat:
    """A preset (or a TaskFormat) with its field names optionally replaced, templates kept."""
    preset = PRESETS.get(task) if isinstance(task, str) else task
    if not isinstance(preset, TaskFormat):
        raise ValueError(f"unknown task preset {task!r}; use one of {sorted(PRESETS)} or a TaskFormat")
    return replace(
        preset,
        prompt_field=prompt_field or preset.prompt_field,
        answer_field=answer_field or preset.answer_field,
    )


def load_pairs(path: str | Path, task: str | TaskFormat = "gsm8k") -> list[PromptAnswer]:
    """Prompt/answer pairs of a jsonl (or .jsonl.gz) file, formatted by a preset name or a TaskFormat."""
    task_format = resolve_task_format(task)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data not found: {path}")
    fields = (task_format.prompt_field, task_format.answer_field)
    hint = "Name the fields with a TaskFormat (CLI: --prompt-field / --answer-field)"
    pairs = [
        PromptAnswer(
            task_format.prompt_template.format(prompt=record[task_format.prompt_field]),
            task_format.answer_template.format(answer=record[task_format.answer_field]),
        )
        for record in read_jsonl(path, fields, hint)
    ]
    if not pairs:
        raise ValueError(f"task data {path} is empty")
    return pairs


def split_pairs(
    pairs: list[PromptAnswer], validation: int | float, seed: int = 0
) -> tuple[list[PromptAnswer], list[PromptAnswer]]:
    """A seeded train/validation split; ``validation`` is a count or a fraction."""
    count = validation if isinstance(validation, int) else round(validation * len(pairs))
    if not 0 < count < len(pairs):
        raise ValueError(
            f"validation size {validation} leaves no train or no validation data of {len(pairs)} pairs"
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    train = [p for i, p in enumerate(pairs) if i not in held_out]
    return train, [pairs[i] for i in sorted(held_out)]


TaskSource = str | Path | Sequence[PromptAnswer]


def load_task_source(source: TaskSource, task: str | TaskFormat = "gsm8k") -> list[PromptAnswer]:
    """Pairs from a jsonl file (formatted by ``task``) or a ready list of :class:`PromptAnswer`."""
    if isinstance(source, (str, Path)):
        return load_pairs(source, task)
    pairs = list(source)
    if not pairs:
        raise ValueError("the list of prompt/answer pairs is empty")
    wrong = next((p for p in pairs if not isinstance(p, PromptAnswer)), None)
    if wrong is not None:
        raise TypeError(
            f"train data must be a jsonl path or a list of PromptAnswer, found a {type(wrong).__name__}; "
            "build pairs with optimum_rom.task_data.load_pairs"
        )
    return pairs


def describe_task_source(source: TaskSource, task: str | TaskFormat = "gsm8k") -> str:
    """A short provenance string stored in the config."""
    if isinstance(source, (str, Path)):
        name = task if isinstance(task, str) else f"{task.prompt_field} -> {task.answer_field}"
        return f"{Path(source).name} ({name})"
    return f"{len(source)} prompt/answer pairs"


def training_examples(
    tokenizer, pairs: list[PromptAnswer], num_samples: int, max_length: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Up to ``num_samples`` pairs drawn with ``seed``, tokenized with answer-only labels."""
    if len(pairs) > num_samples:
        pairs = random.Random(seed).sample(pairs, num_samples)
    examples = tokenize_pairs(tokenizer, pairs, max_length)
    if not examples:
        raise ValueError(
            f"no training pair keeps an answer token within {max_length} tokens; raise seq_len (CLI: --seq-len)"
        )
    return examples


def tokenize_pairs(
    tokenizer, pairs: list[PromptAnswer], max_length: int = 512
) -> list[dict[str, torch.Tensor]]:
    """``input_ids`` and ``labels`` per pair, labels = ``IGNORE_INDEX`` on the prompt tokens.

    The prompt and the answer are tokenized separately and concatenated, so the boundary is
    exact; sequences are truncated to ``max_length`` from the right.
    """
    examples = []
    for pair in pairs:
        prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(pair.answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            continue  # the answer was truncated away: nothing to learn or score
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return examples


def collate(examples: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get ``IGNORE_INDEX`` labels and a zero attention mask."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
    }
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        batch["input_ids"][row, :size] = example["input_ids"]
        batch["labels"][row, :size] = example["labels"]
        batch["attention_mask"][row, :size] = 1
    return batch


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token in some row of a collated batch, and the
    tokens they predict (``IGNORE_INDEX`` where a row has none there).

    Logits are computed only at those positions (transformers' ``logits_to_keep``), which skips the
    vocabulary projection, the costliest matmul of a small model, on the prompts; an onnxruntime
    model computes them all and the positions are picked after.
    """
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if not isinstance(model, torch.nn.Module):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, positions], targets[:, positions]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=positions,
        use_cache=False,
    ).logits
    return logits, targets[:, positions]


def answer_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens of a collated batch, and their count (shared by
    evaluation and training)."""
    logits, picked = answer_logits(model, batch)
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), picked.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int((picked != IGNORE_INDEX).sum())
