"""Basis Selection's training steps, on the shared loop (optimum_rom.training).

Batches are a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted one would. The loss is the cross-entropy on answer tokens only.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ...task_data import answer_nll, collate
from ...training import Budget, adam, batch_indices, train

MAX_GRAD_NORM = 1.0


def train_steps(
    model: nn.Module,
    param_groups: list[dict],
    examples: list[dict[str, torch.Tensor]],
    *,
    first_step: int,
    steps: int,
    batch_size: int,
    seed: int,
    bar: tqdm,
    status: dict[str, str] | None = None,
    precision: str = "float32",
) -> float:
    """``steps`` Adam steps (a fresh optimizer: the trainable tensors change shape between rounds).

    Returns the mean loss of the steps.
    """

    def loss_at(step: int) -> torch.Tensor:
        batch = collate([examples[i] for i in batch_indices(len(examples), batch_size, seed, step)])
        nll, tokens = answer_nll(model, batch)
        return nll / max(tokens, 1)

    def show(step: int, loss: float) -> None:
        bar.set_postfix({**(status or {}), "loss": f"{loss:.3f}"}, refresh=False)
        bar.update(1)

    optimizer = adam(param_groups)
    losses = train(
        optimizer,
        loss_at,
        Budget(steps=steps),
        clip=MAX_GRAD_NORM,
        first_step=first_step,
        after_step=show,
        precision=precision,
    )
    return sum(losses) / len(losses)
