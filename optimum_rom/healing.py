"""Healing: a short, time-budgeted LoRA fine-tune of a compressed model, merged back.

LoRA adapters (PEFT) go on every linear inside the decoder blocks, and for factorized layers on
the two factors themselves (``q_proj.down``, ``q_proj.up``), so merging them back leaves every
matrix exactly the size it was: the model keeps its parameter count. The loss is the language
modelling loss on the user's text, or (``distill``) the KL divergence to the dense model's
next-token distribution, which carries more signal per token. Either counts only the data's
target tokens: for chat data, what the assistant says.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from .calibration.data import CalibrationSet
from .integrations.peft import merge_adapters
from .structure import find_blocks
from .training import Budget, frozen_except, train


@dataclass
class HealingReport:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float  # mean over the last tenth of the steps

    def to_dict(self) -> dict:
        return asdict(self)


def block_linear_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the decoder blocks, factors of factorized layers included."""
    blocks_name, blocks = find_blocks(model)
    return [
        f"{blocks_name}.{index}.{name}"
        for index, block in enumerate(blocks)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]


def heal(
    model: nn.Module,
    data: CalibrationSet,
    minutes: float,
    teacher: nn.Module | None = None,
    lora_rank: int = 16,
    lr: float = 2e-4,
    batch_size: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    steps: int | None = None,
) -> HealingReport:
    """Fine-tune ``model`` in place for about ``minutes`` (or ``steps`` steps, if fewer) on the windows
    of ``data``.

    With a ``teacher`` (the dense model) the loss is the distillation KL, otherwise next-token
    cross-entropy. The adapters are merged before returning, so the model's sizes are unchanged.
    """
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    budget = Budget(steps=steps, seconds=minutes * 60)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    bar = tqdm(total=round(budget.seconds), desc="healing", unit="s", disable=not progress)

    def show(step: int, loss: float) -> None:
        bar.update(min(round(time.perf_counter() - started), bar.total) - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", steps=step + 1)

    with frozen_except(model, train=True), bar:
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=lora_rank,
                lora_alpha=2 * lora_rank,
                lora_dropout=0.0,
                target_modules=block_linear_names(model),
            ),
        )
        optimizer = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
        )

        def loss_at(step: int) -> torch.Tensor:
            rows = torch.randint(0, len(data), (batch_size,), generator=generator)
            return _loss(peft_model, teacher, data.rows(rows), temperature)

        losses = train(optimizer, loss_at, budget, clip=1.0, after_step=show)
        merge_adapters(peft_model)
    tail = losses[-max(1, len(losses) // 10) :]
    return HealingReport(
        steps=len(losses),
        tokens=len(losses) * batch_size * data.input_ids.shape[1],
        seconds=time.perf_counter() - started,
        first_loss=losses[0] if losses else math.nan,
        last_loss=sum(tail) / len(tail) if tail else math.nan,
    )


def _loss(
    model: nn.Module, teacher: nn.Module | None, batch: CalibrationSet, temperature: float
) -> torch.Tensor:
    ids = batch.input_ids
    if teacher is None:
        return model(input_ids=ids, labels=batch.labels()).loss
    logits = model(input_ids=ids).logits[:, :-1].float()
    with torch.no_grad():
        reference = teacher(input_ids=ids).logits[:, :-1].float()
    if batch.loss_mask is not None:  # the positions that predict a target token
        predicts = batch.loss_mask[:, 1:]
        logits, reference = logits[predicts], reference[predicts]
    student = F.log_softmax(logits / temperature, dim=-1).flatten(0, -2)
    dense = F.log_softmax(reference / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(student, dense, log_target=True, reduction="batchmean") * temperature**2
