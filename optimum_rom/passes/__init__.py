"""The compression passes, one module per method, looked up by config type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..allocation import RankPlan
from ..configs import LowRankConfig, RomConfig, SvdConfig
from .rom import plan_rom, run_rom
from .svd import plan_svd, run_svd


@dataclass(frozen=True)
class CompressionPass:
    """``plan`` sizes the ranks before any work (so bad targets fail fast); ``run`` compresses in place."""

    plan: Callable[[nn.Module, LowRankConfig], RankPlan]
    run: Callable[..., RankPlan]
    needs_calibration: bool = True


PASSES: dict[type[LowRankConfig], CompressionPass] = {
    RomConfig: CompressionPass(plan_rom, run_rom),
    SvdConfig: CompressionPass(plan_svd, run_svd, needs_calibration=False),
}


def pass_for(config: LowRankConfig) -> CompressionPass:
    for config_type, compression_pass in PASSES.items():
        if type(config) is config_type:
            return compression_pass
    raise TypeError(
        f"no compression pass for {type(config).__name__}; use one of {[c.__name__ for c in PASSES]}"
    )
