"""The small training loop Basis Selection needs, on a CPU.

Batches are a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted one would. The loss is the cross-entropy on answer tokens only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ...evaluation.task_loss import answer_nll
from ...task_data import collate

MAX_GRAD_NORM = 1.0


@contextmanager
def training_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """Freeze every weight, switch to train mode (and gradient checkpointing); undo it all on exit.

    Parameters created meanwhile (the factorized layers) end up trainable, like a freshly loaded model's.
    """
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    was_training = model.training
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
        for parameter in model.parameters():
            parameter.requires_grad_(flags.get(parameter, True))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of batch ``step``: consecutive slices of one seeded permutation per epoch."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(num_examples, generator=generator)[offset]))
    return indices


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
) -> float:
    """``steps`` AdamW steps (a fresh optimizer: the trainable tensors change shape between rounds).

    Returns the mean loss of the steps.
    """
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    parameters = [p for group in param_groups for p in group["params"]]
    losses = []
    for step in range(first_step, first_step + steps):
        batch = collate([examples[i] for i in batch_indices(len(examples), batch_size, seed, step)])
        nll, tokens = answer_nll(model, batch)
        loss = nll / max(tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix({**(status or {}), "loss": f"{losses[-1]:.3f}"}, refresh=False)
        bar.update(1)
    return sum(losses) / len(losses)
