"""Configuration of the ROM pass (reduced-order modelling of latent features)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import HealingSpec, LowRankConfig
from .options import choices, default

ALLOCATIONS = choices("allocation")
TARGETS = choices("target")
# Named settings, measured on SmolLM2-135M (see the README's quality table). "auto" is the best
# combination without the time budget, which the user chooses (heal_minutes).
AUTO: dict[str, object] = {
    "allocation": "adaptive",
    "scoring": "direction",
    "target": "local",
    "refine_epochs": 2,
}
PRESETS: dict[str, dict[str, object]] = {
    "auto": AUTO,
    "paper": {"allocation": "paper", "target": "local"},
    "uniform": {"allocation": "uniform", "target": "local"},
    # auto, then healing for the time the compression left of the budget (the lever that bought the
    # most quality per minute; spending part of the budget on 8 refinement epochs instead measured
    # worse with 20 minutes and a small, mixed gain with 60: docs/quality.md, "Block refinement")
    "best": {**AUTO, "time_budget": 60.0},
}


@dataclass
class RomConfig(LowRankConfig):
    """ROM: per-linear PCA of the output features on calibration data.

    Args:
        allocation: how the parameter budget is spread over the blocks.
            ``"uniform"``: every block, the same per-matrix budget.
            ``"paper"``: only the trailing blocks, as the paper does (its leading blocks stay dense).
            ``"adaptive"``: each linear's rank from its measured damage (output spectrum weighted by
            the loss gradient at its output), spending the budget where it hurts least; some
            linears stay dense. Streams like the others: the gradients are measured block by block.
        scoring: for ``"adaptive"``: ``"matrix"`` weights a linear's spectrum by its mean squared
            output gradient; ``"direction"`` weights each principal direction by the gradient's
            energy along it (see optimum_rom.calibration.sensitivity).
        metric: the error each linear's factorization minimizes. ``"features"`` (the paper): the
            squared error of its output features. ``"fisher"``: that error weighted by the
            covariance ``G`` of the loss gradient at the output, the second-order estimate of what
            the error costs the loss, so directions the loss does not feel are dropped first
            (needs ``allocation="adaptive"``, whose gradient pass measures ``G``). ``"scored"``:
            the same weighted error, minimized over the features' own principal directions: a
            linear keeps the ``r`` whose variance times gradient energy ``lambda_i u_i^T G u_i`` is
            largest (the expected loss increase of dropping each, which adds up exactly over them)
            instead of the ``r`` of largest variance, and the allocation ranks them so too. No
            rotation, no damping: the kept directions are ones the features have.
        fisher_damping: for ``"fisher"``: the metric is ``(1 - d) G / mean(diag G) + d I``. ``G``
            comes from a few thousand tokens and has small eigenvalues it cannot trust; ``d = 1``
            is the plain feature metric.
        num_trailing_blocks: for ``"paper"``: how many trailing blocks to compress. ``None``
            picks the count at which each compressed matrix keeps about half of its parameters,
            which is what the paper's 80% LLaMA-7B setting amounts to.
        center: project mean-centred features and put the mean back through the bias (the
            paper's centred covariance made exact); ``False`` uses the uncentred second moment.
        target: what each factorized linear is fitted to. ``"local"`` (the paper): the principal
            subspace of its own outputs in the partly compressed model. ``"dense"``
            (error-correcting): the dense model's outputs, predicted from the compressed model's
            inputs, so errors of earlier layers are corrected instead of piling up with depth.
            Measured on SmolLM2-135M it is *worse* than ``"local"`` (params ratio 0.8, uniform:
            WikiText-2 perplexity ~5,200 vs ~155 on 20 windows; logit KL after compressing 6
            blocks 0.75 vs 0.57): the least-squares map from noisy inputs shrinks its outputs
            (errors-in-variables attenuation) and the blocks downstream amplify that. Kept for
            study; no preset uses it.
        calibration_precision: what the calibration walks' block forwards multiply in (the
            dense statistics pass, the measuring walk of ``"adaptive"``, the compressed block's pass
            that makes the next block's inputs): ``"float32"``, ``"bfloat16"`` (autocast) or
            ``"auto"`` (default: bfloat16 where it is native; see ``training_precision``). The
            features are then rounded to bfloat16's 8 bits before they are summed in float32/float64;
            the hidden states between blocks, the gradient walk and the factorizations stay
            float32/float64. Measured on SmolLM2 it leaves perplexity and the chat where float32
            has them (docs/streaming.md, "Calibration walks in bfloat16").
        factorization_precision: what each linear's basis and spectrum are computed in from its
            float64 sums: ``"float32"`` (default) or ``"float64"``. The products with the weight
            and the eigendecompositions are most of a factorization's arithmetic and run
            faster in float32; the input's Cholesky factor stays float64.
        refine_epochs: after the per-linear fits, epochs of Adam on each whole block's output
            (0 = off), towards the dense block's outputs.
        refine_lr: refinement's (peak) learning rate.
        refine_schedule: ``"constant"`` learning rate, or ``"cosine"`` (AA-SVD's: 10% linear
            warm-up, cosine decay to zero, gradient norm clipped to 1).
        refine_target: what refinement tunes each block towards. ``"local"``: the dense block's
            outputs on the inputs the compressed block sees. ``"dense"``: the dense model's own
            hidden states after that block (AA-SVD's anchor), so each block also makes up for the
            errors of the blocks before it; the walk carries the dense model's stream beside the
            compressed one (one more dense block forward per block, twice the hidden states).
        refine_params: what refinement trains: ``"factors"`` (the factorized linears) or
            ``"block"`` (every parameter of the block: its norms and the linears kept dense too).
        heal_minutes: after compression, fine-tune on the calibration text for this many minutes
            (sizes unchanged; 0 = off). See optimum_rom.healing.
        heal_params: what healing trains: ``"lora"`` adapters (PEFT), merged back, or ``"full"``:
            every parameter of the decoder blocks, which needs 12 more bytes per parameter
            (gradients, Adam's state).
        heal_schedule: healing's learning rate: ``"constant"``, or ``"cosine"`` over the healing
            time (10% linear warm-up, cosine decay to zero when the time is up).
        heal_lr: healing's (peak) learning rate; ``None``: the one measured for ``heal_params``
            (see :attr:`HealingSpec.lr`).
        time_budget: minutes the whole ``compress`` call may take (self-calibration, measurement,
            compression, healing): healing gets the time the rest leaves, and is skipped, with a
            warning, when nothing is left (0 = no budget). Exclusive with ``heal_minutes``.
        heal_distill: heal towards the dense model's next-token distribution (knowledge
            distillation) instead of the text's next tokens.
    """

    allocation: str = default("allocation")
    scoring: str = default("scoring")
    metric: str = default("metric")
    fisher_damping: float = default("fisher_damping")
    num_trailing_blocks: int | None = default("num_trailing_blocks")
    center: bool = True
    target: str = default("target")
    calibration_precision: str = default("calibration_precision")
    factorization_precision: str = default("factorization_precision")
    refine_epochs: int = default("refine_epochs")
    refine_lr: float = default("refine_lr")
    refine_schedule: str = default("refine_schedule")
    refine_target: str = default("refine_target")
    refine_params: str = default("refine_params")
    heal_minutes: float = default("heal_minutes")
    heal_params: str = default("heal_params")
    heal_schedule: str = default("heal_schedule")
    heal_lr: float | None = default("heal_lr")
    time_budget: float = default("time_budget")
    heal_distill: bool = default("heal_distill")
    quant_method: str = "rom"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "dense" and not self.center:
            raise ValueError("target='dense' fits centred features; it needs center=True")
        if not isinstance(self.refine_epochs, int) or self.refine_epochs < 0:
            raise ValueError(f"refine_epochs must be a non-negative integer, got {self.refine_epochs!r}")
        if not isinstance(self.refine_lr, (int, float)) or not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be a positive number, got {self.refine_lr!r}")
        for field in (
            "scoring",
            "metric",
            "calibration_precision",
            "factorization_precision",
            "refine_schedule",
            "refine_target",
            "refine_params",
            "heal_params",
            "heal_schedule",
        ):
            if getattr(self, field) not in choices(field):
                raise ValueError(f"{field} must be one of {choices(field)}, got {getattr(self, field)!r}")
        if self.metric != "features" and self.allocation != "adaptive":
            raise ValueError(
                f"metric={self.metric!r} weights each fit by the loss gradients that allocation='adaptive' "
                f"measures; with allocation={self.allocation!r} there are none (CLI: --allocation adaptive, "
                "or --preset auto)"
            )
        if self.metric != "features" and self.target != "local":
            raise ValueError(f"metric={self.metric!r} weights the local fits; it needs target='local'")
        damping = self.fisher_damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping <= 1:
            raise ValueError(f"fisher_damping must be a number in (0, 1], got {damping!r}")
        for field in ("heal_minutes", "time_budget"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{field} must be a non-negative number of minutes, got {value!r}")
        if self.heal_lr is not None and (
            isinstance(self.heal_lr, bool)
            or not isinstance(self.heal_lr, (int, float))
            or not self.heal_lr > 0
        ):
            raise ValueError(f"heal_lr must be a positive number or None, got {self.heal_lr!r}")
        if self.heal_minutes and self.time_budget:
            raise ValueError(
                "heal_minutes and time_budget are both set: choose one (time_budget heals for the time "
                "compression leaves of it; CLI: --heal-minutes 0 with --preset best, or --time-budget 0)"
            )
        if self.num_trailing_blocks is not None and (
            not isinstance(self.num_trailing_blocks, int) or self.num_trailing_blocks < 1
        ):
            raise ValueError(
                f"num_trailing_blocks must be a positive integer or None, got {self.num_trailing_blocks!r}"
            )

    @classmethod
    def from_preset(cls, preset: str, **overrides: object) -> RomConfig:
        """A named setting (``"auto"``: the best measured combination), with explicit overrides."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    def healing(self) -> HealingSpec | None:
        shared = {
            "distill": self.heal_distill,
            "precision": self.training_precision,
            "trained": self.heal_params,
            "schedule": self.heal_schedule,
            "learning_rate": self.heal_lr,
        }
        if self.time_budget:
            return HealingSpec(minutes=self.time_budget, within_budget=True, **shared)
        if not self.heal_minutes:
            return None
        return HealingSpec(minutes=self.heal_minutes, **shared)

    def factorized_bias(self, dense_has_bias: bool) -> bool:
        return self.center or dense_has_bias
