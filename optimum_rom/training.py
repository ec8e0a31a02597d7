"""The one optimisation loop: healing, block refinement and Basis Selection all step through it.

Each caller says what a step's loss is (``loss_at(step)``, so batches can be a pure function of
the step and a resumed run sees the batches an uninterrupted one would), which parameters the
optimizer (:func:`adam`, the same for every loop, or :class:`AdamInBackward`, the same update taken
during the backward) moves, and for how long (a :class:`Budget` of
steps or seconds); :func:`frozen_except` makes sure that nothing else is trained and that the
model comes back as it was. Every loop can
run its forward in bfloat16 (``precision``, see :func:`optimum_rom.precision.compute_dtype`):
torch's autocast, so the weights, the gradients and the optimizer's state stay float32
(mixed-precision training).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .precision import autocast, compute_dtype


@dataclass(frozen=True)
class Budget:
    """Stop after ``steps`` steps or ``seconds`` of wall time, whichever comes first (``None``: no limit).

    Wall time is what a user can wait for; steps are what a test (or a resumed run) can repeat.
    """

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("a training budget needs steps or seconds")

    def share_spent(self, steps: int, seconds: float) -> float:
        """How much of the budget ``steps`` steps in ``seconds`` have used: 1 when it is spent (a
        budget of nothing is spent from the start)."""
        shares = [0.0]
        for used, limit in ((steps, self.steps), (seconds, self.seconds)):
            if limit is not None:
                shares.append(used / limit if limit > 0 else 1.0)
        return max(shares)


def warmup_cosine(spent: float, warmup: float = 0.1) -> float:
    """The learning rate's factor once ``spent`` (0 to 1) of a budget is used: a linear warm-up over
    the first ``warmup`` of it, then a cosine decay to zero (AA-SVD's refinement recipe,
    transformers' ``get_cosine_schedule_with_warmup``). A share of the budget rather than a step
    count, so a wall-clock budget (healing's, whose steps are not known ahead) follows it too."""
    if spent < warmup:
        return spent / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (spent - warmup) / (1 - warmup))))


@contextmanager
def frozen_except(
    model: nn.Module,
    trainable: Iterable[nn.Parameter] = (),
    *,
    train: bool | None = None,
    gradient_checkpointing: bool = False,
) -> Iterator[None]:
    """Freeze every parameter of ``model`` but ``trainable`` (and, optionally, switch the train mode and
    gradient checkpointing); on exit every flag is as it was.

    Parameters created meanwhile (adapters, factorized layers) end up trainable, like a freshly
    loaded model's.
    """
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    was_training = model.training
    model.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train is not None:
        model.train(train)
    try:
        yield
    finally:
        model.train(was_training)
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
        for parameter in model.parameters():
            parameter.requires_grad_(flags.get(parameter, True))


def adam(parameters: Iterable[nn.Parameter] | Iterable[dict], lr: float = 1e-3) -> torch.optim.Adam:
    """The optimizer of every loop: Adam (AdamW without weight decay is the same update), fused.

    torch's default Adam step makes several passes over each tensor and allocates temporaries as
    large as the parameters. It is memory-bound: on a 7B-shaped block, whose refinement steps its
    factors after every single sequence, it took longer than the backward. The fused step (torch's CPU and
    GPU kernel) is one pass with no temporaries: the same update, rounded differently.
    """
    return torch.optim.Adam(parameters, lr=lr, fused=True)


class AdamInBackward:
    """:func:`adam`, stepping each parameter during the backward, as soon as its gradient is
    complete, and freeing that gradient.

    The gradients of all parameters then never exist at once: refinement of a 7B-shaped block holds
    ~0.6 GB of them otherwise, beside Adam's moments. Each tensor's update is Adam's (elementwise,
    one fused step per tensor), so training is the same to the bit. Clipping by the global
    gradient norm needs every gradient first, so it cannot be combined with this. Use it as a
    context manager: the hooks go on exit.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], lr: float = 1e-3) -> None:
        parameters = list(parameters)
        self.param_groups = [{"params": parameters, "lr": lr}]  # what :func:`train` reads
        self._optimizers = {parameter: adam([parameter], lr=lr) for parameter in parameters}
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in parameters]

    def _step(self, parameter: nn.Parameter) -> None:
        self._optimizers[parameter].step()
        parameter.grad = None

    def step(self) -> None:
        """Nothing left to do: every parameter stepped during the backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: each gradient is freed once its step is taken."""

    def __enter__(self) -> AdamInBackward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for hook in self._hooks:
            hook.remove()


def train(
    optimizer: torch.optim.Optimizer | AdamInBackward,
    loss_at: Callable[[int], torch.Tensor],
    budget: Budget,
    *,
    clip: float | None = None,
    first_step: int = 0,
    after_step: Callable[[int, float], None] | None = None,
    precision: str = "float32",
    schedule: Callable[[float], float] | None = None,
) -> list[float]:
    """Step ``optimizer`` on ``loss_at(step)`` for steps ``first_step, first_step + 1, ...`` until the
    budget is spent; gradients are clipped to norm ``clip`` if given (not with
    :class:`AdamInBackward`). Returns the losses.

    ``precision``: what ``loss_at`` runs in (see :func:`optimum_rom.precision.compute_dtype`); the
    backward follows it.

    ``after_step(step, loss)`` is called after each step (progress bars, logs).

    ``schedule(spent)``: before each step, each parameter group's learning rate is the one it came
    with times this factor of the share of ``budget`` spent (e.g. :func:`warmup_cosine`); on return
    the rates are as they came. Not with :class:`AdamInBackward`, whose per-tensor steps keep rates
    of their own.
    """
    if isinstance(optimizer, AdamInBackward) and (clip is not None or schedule is not None):
        raise ValueError(
            "gradient clipping and learning-rate schedules need the whole step: use adam(), not AdamInBackward"
        )
    rates = [group["lr"] for group in optimizer.param_groups]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    device = parameters[0].device if parameters else torch.device("cpu")
    dtype = compute_dtype(precision, device)
    losses: list[float] = []
    started, elapsed = time.perf_counter(), 0.0  # elapsed: at the end of the last step
    with torch.enable_grad():
        while (spent := budget.share_spent(len(losses), elapsed)) < 1:
            if schedule is not None:
                _scale_rates(optimizer, rates, schedule(spent))
            step = first_step + len(losses)
            with autocast(dtype, device):
                loss = loss_at(step).float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip)
            optimizer.step()
            losses.append(loss.item())
            if after_step is not None:
                after_step(step, losses[-1])
            elapsed = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    _scale_rates(optimizer, rates, 1.0)
    return losses


def _scale_rates(
    optimizer: torch.optim.Optimizer | AdamInBackward, rates: list[float], factor: float
) -> None:
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate * factor


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of batch ``step``: consecutive slices of one seeded permutation per epoch."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(num_examples, generator=generator)[offset]))
    return indices
