"""The compression passes, one module per method, looked up by config type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..allocation import RankPlan
from ..configs import LowRankConfig, RomConfig, SvdConfig
from .rom import check_calibration_size, plan_rom, run_rom
from .svd import plan_svd, run_svd


def _no_check(config: LowRankConfig, plan: RankPlan, input_ids: torch.Tensor | None) -> None:
    return None


@dataclass(frozen=True)
class CompressionPass:
    """How the optimizer drives a method.

    ``plan`` sizes the ranks before any work, ``check`` validates the calibration data against
    the plan (both so bad input fails fast), ``run`` compresses in place. ``streams``: ``run``
    accepts ``stream=`` and so works block by block on models that are not in memory.
    """

    plan: Callable[[nn.Module, LowRankConfig], RankPlan]
    run: Callable[..., RankPlan]
    check: Callable[[LowRankConfig, RankPlan, torch.Tensor | None], None] = _no_check
    streams: bool = False
    needs_calibration: bool = True


PASSES: dict[type[LowRankConfig], CompressionPass] = {
    RomConfig: CompressionPass(plan_rom, run_rom, check_calibration_size, streams=True),
    SvdConfig: CompressionPass(plan_svd, run_svd, needs_calibration=False),
}


def pass_for(config: LowRankConfig) -> CompressionPass:
    for config_type, compression_pass in PASSES.items():
        if type(config) is config_type:
            return compression_pass
    raise TypeError(
        f"no compression pass for {type(config).__name__}; use one of {[c.__name__ for c in PASSES]}"
    )
