"""What every low-rank pass shares: the size target, which linears, the calibration shape, the result.

A config is a transformers ``QuantizationConfigMixin`` so the very same object is written to
``config.json`` under ``quantization_config`` and read back by ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .options import choices, default


@dataclass(frozen=True)
class HealingSpec:
    """The healing stage a config asks for after its pass: a fine-tune of the compressed model that
    leaves every matrix its size.

    ``trained``: ``"lora"`` adapters merged back, or ``"full"``: every parameter of the decoder
    blocks (12 more bytes per parameter for its gradient and Adam's state: for models whose blocks
    fit in memory four times). ``learning_rate``: ``None`` picks the one measured for ``trained``.
    ``minutes`` / ``steps``: the budget (wall time for users, steps for a fixed amount of work).
    ``distill``: towards the dense model's next-token distribution (else the data's own tokens).
    ``within_budget``: ``minutes`` is the whole run's time budget, not the healing's: healing gets
    what the stages before it left (the optimizer measures from the start of ``compress``).
    ``targets`` (LoRA): ``"blocks"`` every linear in the decoder blocks (factors included),
    ``"factors"`` only the factors of factorized linears. ``first_step`` continues a pass's batch sequence.
    ``precision``: of the training steps (see optimum_rom.precision.compute_dtype).
    ``schedule``: the learning rate, ``"constant"`` or ``"cosine"`` over the budget (see
    :func:`optimum_rom.training.warmup_cosine`).
    """

    minutes: float | None = None
    steps: int | None = None
    distill: bool = True
    within_budget: bool = False
    trained: str = default("heal_params")
    rank: int = 16
    alpha: int = 32
    learning_rate: float | None = None
    batch_size: int = 4
    targets: str = "blocks"
    gradient_checkpointing: bool = False
    first_step: int = 0
    precision: str = default("training_precision")
    schedule: str = default("heal_schedule")

    @property
    def lr(self) -> float:
        """The step size: ``learning_rate``, or the one measured best for what is trained (full
        fine-tuning diverges at LoRA's)."""
        return (
            self.learning_rate
            if self.learning_rate is not None
            else {"lora": 2e-4, "full": 5e-5}[self.trained]
        )


@dataclass
class LowRankConfig(QuantizationConfigMixin):
    """Options shared by all passes.

    Args:
        params_ratio: fraction of the parameters to keep, of what ``ratio_of`` names; 0.8 removes
            20%. Must be in (0, 1].
        ratio_of: ``"model"``: of the whole model (embeddings included, tied weights counted
            once: what a user's disk and memory hold); ``"linears"``: of the decoder blocks' linears
            only, as papers count (SVD-LLM, AA-SVD, Dobi-SVD), to set numbers beside theirs.
        target_modules: names (or name suffixes, PEFT-style) of the linears that may be
            factorized; ``None`` means every ``nn.Linear`` inside the decoder blocks.
        num_samples / seq_len: calibration sequences and their length in tokens.
        seed: seeds the calibration sampling, so a run is reproducible.
        training_precision: what every training step (block refinement, healing, Basis
            Selection's rounds) multiplies in: ``"bfloat16"`` runs the forward under autocast while
            the weights, gradients and optimizer state stay float32 (mixed precision); ``"auto"``
            picks it where the hardware has native bfloat16 arithmetic (a CPU with AVX512-BF16 or
            AMX multiplies several times faster in it), float32 elsewhere (emulated bfloat16 is
            slower). The statistics, factorizations and held-out checks always run in float32 or
            float64.
        modules: filled by the pass: module name -> rank of every factorized linear. This is
            what loading uses to rebuild the factorized skeleton.
        calibration: filled by the optimizer: a short description of the calibration source.
        source_model: filled by the optimizer: the dense model compressed (a known alias or an
            absolute path), which the chat evaluation compares the compressed model's answers with.
        kept_ratios: filled by the optimizer: the planned size in both accountings,
            ``{"model": ..., "linears": ...}``, whichever one ``params_ratio`` targeted.
    """

    params_ratio: float = default("params_ratio")
    ratio_of: str = default("ratio_of")
    target_modules: list[str] | None = default("target_modules")
    num_samples: int = default("num_samples")
    seq_len: int = default("seq_len")
    seed: int = default("seed")
    training_precision: str = default("training_precision")
    modules: dict[str, int] = field(default_factory=dict)
    calibration: str | None = None
    source_model: str | None = None
    kept_ratios: dict[str, float] | None = None
    quant_method: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.params_ratio, (int, float)) or not 0 < self.params_ratio <= 1:
            raise ValueError(
                f"params_ratio must be in (0, 1] (the fraction of parameters kept; 0.8 removes 20%), "
                f"got {self.params_ratio!r}"
            )
        if self.ratio_of not in choices("ratio_of"):
            raise ValueError(
                f"ratio_of must be one of {choices('ratio_of')} (what params_ratio is a fraction of), got {self.ratio_of!r}"
            )
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.training_precision not in choices("training_precision"):
            raise ValueError(
                f"training_precision must be one of {choices('training_precision')}, got {self.training_precision!r}"
            )
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    def healing(self) -> HealingSpec | None:
        """The healing stage that follows the pass (``None``: none)."""
        return None

    def factorized_bias(self, dense_has_bias: bool) -> bool:
        """Whether a factorized linear carries a bias on ``up`` (passes that correct the mean always do)."""
        return dense_has_bias

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_json_file(cls, path: str | Path) -> LowRankConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
