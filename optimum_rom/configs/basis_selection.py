"""Configuration of the Basis Selection pass (application-specific low-rank compression)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import HealingSpec, LowRankConfig
from .options import BASIS_SELECTION_SHAPE, choices, default

BASES = choices("bases")
_POSITIVE_INTS = (
    "num_rounds",
    "steps_per_round",
    "batch_size",
    "new_rank",
    "calibration_windows",
    "fine_tune_rank",
)
_POSITIVE_FLOATS = ("learning_rate", "new_bases_learning_rate", "fine_tune_learning_rate")


@dataclass
class BasisSelectionConfig(LowRankConfig):
    """Basis Selection (Li et al., "Basel"): keep the SVD bases the target application uses.

    Every selected linear is written as ``W = sum_i c_i u_i v_i^T`` over its SVD bases, with frozen
    ``u_i, v_i`` and trainable ``c_i = w_i^2`` (initialized to the singular values), plus ``new_rank``
    new LoRA bases. The coefficients and new bases are trained with the cross-entropy on the answer
    tokens of the target data; after each round the bases with the smallest coefficients are
    pruned, until every matrix has the rank the ``params_ratio`` budget gives it. Kept and new bases
    are then merged and re-factorized into ``FactorizedLinear`` layers.

    The defaults are sized for a CPU (a SmolLM2-135M run takes minutes); the paper's values are in
    brackets.

    Args:
        bases: ``"svd"``: the SVD bases of each weight, as the paper. ``"activation"`` (default): the
            SVD of each weight in the metric of its inputs on the target data (ROM's output
            eigenvectors, SVD-LLM's whitening), so a basis's initial coefficient is what it carries
            on that data. Both write ``W`` exactly; they differ in which bases look small before
            training. With the paper's hours of GPU training the plain SVD start is recovered from;
            with minutes of CPU training it is not: truncating SmolLM2's SVD bases to 80% of the
            parameters breaks the model, truncating the activation-aware ones does not. The output
            head always uses plain SVD bases.
        calibration_windows: ``seq_len``-token windows of the training text that measure the
            input statistics of ``"activation"`` bases.
        num_samples: training examples drawn (seeded) from the train set; steps cycle through them.
        seq_len: maximum tokens of one prompt + answer (longer ones are cut from the right).
        num_rounds: pruning rounds [paper: 100]. Each round prunes, then trains; the kept rank
            follows the cubic gradual-pruning schedule, so most bases go in the early rounds, when
            they matter least, and the last round trains at the final rank.
        steps_per_round: optimizer steps after each pruning.
        batch_size: examples per step.
        new_rank: new bases per matrix (LoRA rank) [paper: ~32 on Llama-2-7B's 4096-wide matrices];
            a matrix whose final rank ``r`` is small gets at most ``r // 2``.
        learning_rate: AdamW step size of the coefficient roots ``w``.
        new_bases_learning_rate: AdamW step size of the new bases.
        include_lm_head: also factorize the output head, as the paper does, when it is not tied to
            the input embeddings. A tied head is never factorized: the embedding matrix would stay
            and the factors would come on top of it, growing the model.
        gradient_checkpointing: recompute block activations in the backward pass: less memory
            for more time. Off by default: on a CPU time is the scarce resource, and SmolLM2-135M
            at batch 4 trains in about 5 GB without it. Turn it on for larger models or batches.
        fine_tune_steps: optional second stage: LoRA on the factors of the compressed model, merged
            back (the size does not change); 0 skips it.
        fine_tune_rank / fine_tune_learning_rate: the LoRA rank and step size of that stage.
    """

    bases: str = default("bases")
    calibration_windows: int = 32
    num_samples: int = BASIS_SELECTION_SHAPE["num_samples"]
    seq_len: int = BASIS_SELECTION_SHAPE["seq_len"]
    num_rounds: int = default("num_rounds")
    steps_per_round: int = default("steps_per_round")
    batch_size: int = default("batch_size")
    new_rank: int = default("new_rank")
    learning_rate: float = 5e-3
    new_bases_learning_rate: float = 1e-3
    include_lm_head: bool = True
    gradient_checkpointing: bool = default("gradient_checkpointing")
    fine_tune_steps: int = default("fine_tune_steps")
    fine_tune_rank: int = 8
    fine_tune_learning_rate: float = 2e-4
    quant_method: str = "basis_selection"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bases not in BASES:
            raise ValueError(f"bases must be one of {BASES}, got {self.bases!r}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.fine_tune_steps, int) or self.fine_tune_steps < 0:
            raise ValueError(f"fine_tune_steps must be a non-negative integer, got {self.fine_tune_steps!r}")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def healing(self) -> HealingSpec | None:
        """The fine-tune stage: LoRA on the factors, trained on the task, the batches continuing the rounds'."""
        if not self.fine_tune_steps:
            return None
        return HealingSpec(
            steps=self.fine_tune_steps,
            distill=False,
            rank=self.fine_tune_rank,
            alpha=self.fine_tune_rank,
            learning_rate=self.fine_tune_learning_rate,
            batch_size=self.batch_size,
            targets="factors",
            gradient_checkpointing=self.gradient_checkpointing,
            first_step=self.num_rounds * self.steps_per_round,
            precision=self.training_precision,
        )
