"""Healing: a short fine-tune of a compressed model that keeps its size; a stage any pass can be
followed by.

What is trained (:class:`HealingSpec` ``trained``):

- ``"lora"``: LoRA adapters (PEFT) on the linears the spec names: every linear in the decoder
  blocks, and for factorized layers the two factors themselves (``q_proj.down``, ``q_proj.up``),
  or only the factors; merging them back leaves every matrix exactly the size it was. Its
  optimizer state is a few percent of the model's: the choice for models near the memory's limit.
- ``"full"``: every parameter of the decoder blocks (factors, norms, the linears kept dense); the
  embeddings stay as they are (tied to the output head, and the largest matrix a step would
  move). Rather than a rank-16 update per matrix, the factors themselves move: more freedom,
  12 more bytes per trained parameter (its gradient, Adam's two moments), and a smaller step
  size (LoRA's diverges). Whether it heals more depends on the data (see docs/quality.md, "Healing").

What a step minimizes is the caller's loss:

- :class:`WindowLoss` on calibration windows: the language-modelling loss, or (with a teacher,
  the dense model) the KL divergence to its next-token distribution, which carries more signal per
  token. Either counts only the data's target tokens: for chat data, what the assistant says.
- :class:`AnswerLoss` on prompt/answer examples: the cross-entropy of the answers (Basis
  Selection's fine-tune stage), batches a pure function of the step.
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
from .configs import HealingSpec
from .integrations.peft import merge_adapters
from .layers import FactorizedLinear
from .structure import find_blocks
from .task_data import answer_nll, collate
from .training import Budget, adam, batch_indices, frozen_except, train, warmup_cosine


@dataclass
class HealingReport:
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float  # mean over the last tenth of the steps

    def to_dict(self) -> dict:
        return asdict(self)


def lora_targets(model: nn.Module, targets: str) -> list[str]:
    """``"blocks"``: every ``nn.Linear`` inside the decoder blocks, factors of factorized layers
    included; ``"factors"``: the ``down`` / ``up`` factors of every factorized linear."""
    if targets == "factors":
        return [
            f"{name}.{factor}"
            for name, module in model.named_modules()
            if isinstance(module, FactorizedLinear)
            for factor in ("down", "up")
        ]
    blocks_name, blocks = find_blocks(model)
    return [
        f"{blocks_name}.{index}.{name}"
        for index, block in enumerate(blocks)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]


class WindowLoss:
    """Random batches of calibration windows (seeded), distilled from ``teacher`` if given."""

    def __init__(
        self, data: CalibrationSet, teacher: nn.Module | None = None, batch_size: int = 4, seed: int = 0
    ) -> None:
        self.data, self.teacher, self.batch_size = data, teacher, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens = 0

    def __call__(self, model: nn.Module, step: int) -> torch.Tensor:
        batch = self.data.rows(torch.randint(0, len(self.data), (self.batch_size,), generator=self.generator))
        ids = batch.input_ids
        self.tokens += ids.numel()
        if self.teacher is None:
            return model(input_ids=ids, labels=batch.labels()).loss
        logits = model(input_ids=ids).logits[:, :-1]
        with torch.no_grad():
            reference = self.teacher(input_ids=ids).logits[:, :-1]
        if batch.loss_mask is not None:  # the positions that predict a target token
            predicts = batch.loss_mask[:, 1:]
            logits, reference = logits[predicts], reference[predicts]
        return DistillationLoss.apply(logits.flatten(0, -2), reference.flatten(0, -2))


class DistillationLoss(torch.autograd.Function):
    """``KL(teacher || student)`` of next-token distributions, averaged over rows of logits (what
    ``F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True, reduction="batchmean")``
    computes), a few rows at a time.

    Hand-rolled because torch's composition makes half a dozen vocabulary-sized float32
    temporaries per batch (200 MB each for 1024 tokens of a 49k vocabulary) and memory-bound
    passes over them: on a CPU, a large share of a healing step. Row chunks stay in the cache, and the
    gradient, ``softmax(student) - softmax(teacher)``, is formed in the forward in the logits'
    dtype (where autocast's backward would round it anyway).
    """

    ROWS = 16  # a chunk's float32 rows of a 50k vocabulary: ~3 MB, a core's cache

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        gradient = torch.empty_like(student)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(student), DistillationLoss.ROWS):
            rows = slice(start, start + DistillationLoss.ROWS)
            log_student = F.log_softmax(student[rows].float(), dim=-1)
            log_teacher = F.log_softmax(teacher[rows].float(), dim=-1)
            teacher_probs = log_teacher.exp()
            total += (teacher_probs * (log_teacher - log_student)).sum().double()
            gradient[rows] = log_student.exp_().sub_(teacher_probs)
        ctx.save_for_backward(gradient)
        return (total / max(len(student), 1)).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return gradient * (grad_output / max(len(gradient), 1)).to(gradient.dtype), None


class AnswerLoss:
    """The answers' cross-entropy on batches of tokenized prompt/answer examples, batch ``step``
    being a pure function of ``(seed, step)`` (see :func:`optimum_rom.training.batch_indices`)."""

    def __init__(self, examples: list[dict[str, torch.Tensor]], batch_size: int, seed: int = 0) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.tokens = 0

    def __call__(self, model: nn.Module, step: int) -> torch.Tensor:
        rows = batch_indices(len(self.examples), self.batch_size, self.seed, step)
        batch = collate([self.examples[i] for i in rows])
        self.tokens += int(batch["attention_mask"].sum())
        nll, tokens = answer_nll(model, batch)
        return nll / max(tokens, 1)


def heal(
    model: nn.Module, loss: WindowLoss | AnswerLoss, spec: HealingSpec, progress: bool = True
) -> HealingReport:
    """Fine-tune ``model`` in place under ``spec``'s budget (sizes unchanged: adapters are merged)."""
    budget = Budget(steps=spec.steps, seconds=None if spec.minutes is None else spec.minutes * 60)
    if (spec.minutes is not None and spec.minutes <= 0) or (spec.steps is not None and spec.steps < 1):
        raise ValueError(f"healing needs a positive budget, got {spec.minutes} minutes / {spec.steps} steps")
    started = time.perf_counter()
    total, unit = (spec.steps, "step") if spec.steps is not None else (round(budget.seconds), "s")
    bar = tqdm(total=total, desc="healing", unit=unit, disable=not progress)

    def show(step: int, value: float) -> None:
        done = step + 1 - spec.first_step if spec.steps is not None else round(time.perf_counter() - started)
        bar.update(min(done, bar.total) - bar.n)
        bar.set_postfix(loss=f"{value:.3f}", steps=step + 1 - spec.first_step)

    full = spec.trained == "full"
    blocks = list(find_blocks(model)[1].parameters()) if full else []
    with frozen_except(model, blocks, train=True, gradient_checkpointing=spec.gradient_checkpointing), bar:
        if full:
            trained = model
        else:
            targets = lora_targets(model, spec.targets)
            lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets)
            trained = get_peft_model(model, lora)
        optimizer = adam([p for p in trained.parameters() if p.requires_grad], lr=spec.lr)
        losses = train(
            optimizer,
            lambda step: loss(trained, step),
            budget,
            clip=1.0,
            first_step=spec.first_step,
            after_step=show,
            precision=spec.precision,
            schedule=warmup_cosine if spec.schedule == "cosine" else None,
        )
        del optimizer  # its state (twice the trained parameters) before the merge allocates
        if not full:
            merge_adapters(trained)
    tail = losses[-max(1, len(losses) // 10) :]
    return HealingReport(
        steps=len(losses),
        tokens=loss.tokens,
        seconds=time.perf_counter() - started,
        first_loss=losses[0] if losses else math.nan,
        last_loss=sum(tail) / len(tail) if tail else math.nan,
    )
