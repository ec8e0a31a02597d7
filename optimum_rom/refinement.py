"""Block refinement: after the per-linear fits, tune a block's factors so the whole block
reproduces its targets on the calibration data.

Per-linear fits ignore what the non-linear parts of the block (softmax attention, the gated
MLP) do with their errors; a few epochs of Adam on the block output, still one block in
memory, correct much of that. The targets (``RomConfig.refine_target``) are the dense block's
outputs on the compressed model's hidden states (``local``), or the dense model's own hidden
states after the block (``dense``, AA-SVD's anchor: errors of earlier blocks get corrected too).
A held-out eighth of the calibration samples picks the best epoch, so refinement can only help
on data it did not see.

Two more levers beside the epochs (``refine_schedule`` / ``refine_params``): a constant
learning rate or AA-SVD's recipe (10% linear warm-up, then cosine to zero, gradient norm clipped
to 1), and training the factors only or every parameter of the block (its norms and the linears
kept dense too).

A training step takes about ``BACKWARD_TOKENS`` tokens whatever the model's width (see
``backward_batch_size``), so a wide model takes as many steps per epoch as the small ones the
learning rate was tuned on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .calibration.walker import BlockStep, backward_batch_size, call_block
from .layers import FactorizedLinear
from .training import AdamInBackward, Budget, adam, frozen_except, train, warmup_cosine


def refine_block(
    step: BlockStep,
    targets: torch.Tensor,
    epochs: int,
    lr: float = 1e-4,
    seed: int = 0,
    schedule: str = "constant",
    trained: str = "factors",
    precision: str = "float32",
) -> float:
    """Tune ``step.block`` towards ``targets``; return the held-out relative error (mean squared
    error over the targets' variance) of the kept parameters.

    ``trained``: ``"factors"`` (the FactorizedLinear parameters) or ``"block"`` (every parameter of
    the block); ``schedule``: ``"constant"`` or ``"cosine"`` (warm-up, cosine decay, clipping);
    ``precision``: of the training steps (see optimum_rom.precision.compute_dtype). The held-out
    error that picks the epoch is measured in float32 whatever the precision, so a step that
    bfloat16 makes worse is never kept.
    """
    if trained == "block":
        parameters = list(step.block.parameters())
    else:
        parameters = [
            p for m in step.block.modules() if isinstance(m, FactorizedLinear) for p in m.parameters()
        ]
    if not parameters or epochs < 1:
        return float("nan")
    samples = step.inputs.shape[0]
    held_out = max(1, samples // 8)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    train_rows, validation = order[held_out:], order[:held_out]
    scale = targets[validation].var().item() or 1.0
    batch = backward_batch_size(step.batch_size, step.inputs.shape[1])

    def validation_error() -> float:
        with torch.no_grad():
            outputs = call_block(step.block, step.inputs[validation], step.call_kwargs)
            return F.mse_loss(outputs, targets[validation]).item() / scale

    best_error, best_is_current = validation_error(), True
    per_epoch = -(-len(train_rows) // batch)
    with (
        BestParameters(parameters) as best,
        frozen_except(step.block, parameters),
        _optimizer(parameters, lr, schedule) as optimizer,
    ):
        cosine = schedule == "cosine"
        for epoch in range(epochs):
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed + epoch))
            shuffled = train_rows[order]

            def loss_at(index: int, shuffled: torch.Tensor = shuffled) -> torch.Tensor:
                rows = shuffled[index * batch : (index + 1) * batch]
                outputs = call_block(step.block, step.inputs[rows], step.call_kwargs)
                return F.mse_loss(outputs, targets[rows]) / scale

            train(
                optimizer,
                loss_at,
                Budget(steps=per_epoch),
                clip=1.0 if cosine else None,
                precision=precision,
                # one schedule over all epochs: this epoch's share of its steps is a part of the whole
                schedule=(lambda spent, epoch=epoch: warmup_cosine((epoch + spent) / epochs))
                if cosine
                else None,
            )
            error = validation_error()
            if error < best_error:
                best_error, best_is_current = error, True
                if epoch + 1 < epochs:  # after the last epoch the parameters themselves are the best
                    best.save()
            else:
                best_is_current = False
        if not best_is_current:
            best.restore()
    return best_error


@contextmanager
def _optimizer(
    parameters: list[torch.nn.Parameter], lr: float, schedule: str
) -> Iterator[torch.optim.Optimizer | AdamInBackward]:
    """Adam for the schedule.

    A constant rate steps each factor during the backward, so the block's gradients never exist
    all at once; the cosine schedule (its rates, its clipping) needs every gradient first.
    """
    if schedule == "cosine":
        yield adam(parameters, lr=lr)
    else:
        with AdamInBackward(parameters, lr=lr) as optimizer:
            yield optimizer


class BestParameters:
    """The parameters of the best epoch so far, in a temporary file instead of in memory.

    Held through training beside the gradients and Adam's two moments, a copy in memory would be
    a fifth of refinement's peak (on a 7B-shaped block the factors are ~0.6 GB). A file costs a
    write per improving epoch and no resident memory (the page cache is the kernel's to drop);
    restoring reads straight into the parameters' storage, one tensor at a time.
    """

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = parameters
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by __exit__
        self.save()

    def __enter__(self) -> BestParameters:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()

    def save(self) -> None:
        self.file.seek(0)
        for p in self.parameters:
            self.file.write(_bytes(p.detach().contiguous()))

    def restore(self) -> None:
        self.file.seek(0)
        with torch.no_grad():
            for p in self.parameters:
                in_place = p.is_contiguous()
                saved = p.detach() if in_place else torch.empty_like(p, memory_format=torch.contiguous_format)
                view = _bytes(saved)
                if self.file.readinto(view) != view.nbytes:
                    raise OSError(f"the refinement's saved parameters in {self.file.name} were cut short")
                if not in_place:
                    p.copy_(saved)


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's storage as bytes (numpy has no bfloat16, bytes it can share)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data
