"""Configuration of the ROM pass (reduced-order modelling of latent features)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LowRankConfig

ALLOCATIONS = ("uniform", "paper")


@dataclass
class RomConfig(LowRankConfig):
    """ROM: per-linear PCA of the output features on calibration data.

    Args:
        allocation: how the parameter budget is spread over the blocks.
            ``"uniform"``: every block, the same per-matrix budget.
            ``"paper"``: only the trailing blocks, as the paper does (its leading blocks stay dense).
        num_trailing_blocks: for ``"paper"``: how many trailing blocks to compress. ``None``
            picks the count at which each compressed matrix keeps about half of its parameters,
            which is what the paper's 80% LLaMA-7B setting amounts to.
        center: project mean-centred features and put the mean back through the bias (the
            paper's centred covariance made exact); ``False`` uses the uncentred second moment.
    """

    allocation: str = "uniform"
    num_trailing_blocks: int | None = None
    center: bool = True
    quant_method: str = "rom"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.num_trailing_blocks is not None and (
            not isinstance(self.num_trailing_blocks, int) or self.num_trailing_blocks < 1
        ):
            raise ValueError(
                f"num_trailing_blocks must be a positive integer or None, got {self.num_trailing_blocks!r}"
            )

    def factorized_bias(self, dense_has_bias: bool) -> bool:
        return self.center or dense_has_bias
