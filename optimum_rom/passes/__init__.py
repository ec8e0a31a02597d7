"""The compression passes, one module per method, looked up by config type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from torch import nn

from ..allocation import RankPlan
from ..configs import BasisSelectionConfig, LowRankConfig, RomConfig
from .basis_selection import plan_basis_selection, run_basis_selection
from .rom import plan_rom, run_rom


class PassData(Enum):
    """What a pass consumes; the optimizer loads and checks it before any expensive work."""

    CALIBRATION = "calibration"  # token windows (samples, seq_len): run(model, config, input_ids, ...)
    TASK = "train_dataset"  # tokenized prompt/answer examples: run(model, config, examples, ...)


@dataclass(frozen=True)
class CompressionPass:
    """``plan`` sizes the ranks before any work (so bad targets fail fast); ``run`` compresses in place.

    ``data`` says what ``run`` is given; a ``resumable`` pass also takes ``work_dir=`` and
    continues from the state it left there.
    """

    plan: Callable[[nn.Module, LowRankConfig], RankPlan]
    run: Callable[..., RankPlan]
    data: PassData = PassData.CALIBRATION
    resumable: bool = False


PASSES: dict[type[LowRankConfig], CompressionPass] = {
    RomConfig: CompressionPass(plan_rom, run_rom),
    BasisSelectionConfig: CompressionPass(
        plan_basis_selection, run_basis_selection, data=PassData.TASK, resumable=True
    ),
}


def pass_for(config: LowRankConfig) -> CompressionPass:
    for config_type, compression_pass in PASSES.items():
        if type(config) is config_type:
            return compression_pass
    raise TypeError(
        f"no compression pass for {type(config).__name__}; use one of {[c.__name__ for c in PASSES]}"
    )
