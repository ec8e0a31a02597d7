"""Configuration of the plain-SVD pass: the naive, data-free low-rank baseline."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LowRankConfig
from .options import choices, default


@dataclass
class SvdConfig(LowRankConfig):
    """Truncated SVD of each weight, ``W ~= U_r U_r^T W``: no calibration data, no bias correction.

    It is the baseline the papers compare against: the best rank-``r`` approximation of the
    weight itself, blind to which directions the layer's inputs actually use. Ranks come from
    the same allocation as ROM, so at equal ``params_ratio`` the two differ only in the basis.

    Args:
        allocation / num_trailing_blocks: as in :class:`RomConfig`.
    """

    allocation: str = default("allocation")
    num_trailing_blocks: int | None = default("num_trailing_blocks")
    quant_method: str = "svd"
    allocations = tuple(a for a in choices("allocation") if a != "adaptive")  # adaptive measures data

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in self.allocations:
            raise ValueError(f"allocation must be one of {self.allocations}, got {self.allocation!r}")
