"""The compression passes, one module per method, looked up by config type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..allocation import RankPlan
from ..configs import BasisSelectionConfig, LowRankConfig, RomConfig, SvdConfig
from .basis_selection import plan_basis_selection, run_basis_selection
from .rom import check_calibration_size, plan_rom, run_rom, streams_rom
from .svd import plan_svd, run_svd


class PassData(Enum):
    """What a pass consumes; the optimizer loads and checks it before any expensive work."""

    NONE = "none"  # data-free: run(model, config, None, ...)
    CALIBRATION = "calibration"  # token windows: run(model, config, CalibrationSet, ...)
    TASK = "train_dataset"  # tokenized prompt/answer examples: run(model, config, examples, ...)


def _no_check(config: LowRankConfig, plan: RankPlan, data: object) -> None:
    return None


def _never(config: LowRankConfig) -> bool:
    return False


@dataclass(frozen=True)
class CompressionPass:
    """How the optimizer drives a method.

    ``plan`` sizes the ranks (from the config, or measured on the data), ``check`` validates
    the data against the plan (both before the compression, so bad input fails fast), ``run``
    compresses in place. ``data`` says what ``plan`` and ``run`` are given. ``streams(config)``:
    ``run`` accepts ``stream=`` for this config and so works block by block on models that are
    not in memory. ``resumable``: ``run`` takes ``work_dir=`` and continues from the state
    it left there.
    """

    plan: Callable[..., RankPlan]
    run: Callable[..., RankPlan]
    check: Callable[[LowRankConfig, RankPlan, object], None] = _no_check
    data: PassData = PassData.CALIBRATION
    streams: Callable[[LowRankConfig], bool] = _never
    resumable: bool = False


PASSES: dict[type[LowRankConfig], CompressionPass] = {
    RomConfig: CompressionPass(plan_rom, run_rom, check_calibration_size, streams=streams_rom),
    SvdConfig: CompressionPass(plan_svd, run_svd, data=PassData.NONE),
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
