"""The pass protocol: what a compression method declares, and the one lifecycle the optimizer drives.

Modelled on transformers' ``HfQuantizer`` (capabilities on the class) and llm-compressor's
modifier lifecycle: ``plan`` sizes the ranks (from the config, or measured on the data), ``check``
validates the data against the plan (both before any compression, so bad input fails fast),
``apply`` compresses the model in place. Healing and saving are the optimizer's stages, after any
pass.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..allocation import RankPlan
from ..calibration.walker import BlockStream, WeightSource
from ..configs import LowRankConfig


class PassData(Enum):
    """What a pass consumes; the optimizer loads and checks it before any expensive work."""

    NONE = "none"  # data-free
    CALIBRATION = "calibration"  # token windows, a CalibrationSet
    TASK = "train_dataset"  # tokenized prompt/answer examples


class CompressionPass:
    """A compression method.

    Capabilities: ``config_class`` (the config it serves; the pass is found by that config's
    ``quant_method``), ``data`` (what ``plan`` / ``check`` / ``apply`` are given), ``resumable``
    (``apply`` keeps its progress in ``work_dir`` and continues from it), and :meth:`can_stream`
    (for a given config, ``apply`` works block by block on a model that is not in memory, with
    ``stream``), and :meth:`measures` (``plan`` measures the model: a streamed run keeps the plan for a
    rerun). ``plan`` is given the model's :class:`WeightSource` when the model is on the meta
    device (a streamed run) and a ``scratch`` directory for what a measurement spills to disk.
    """

    config_class: ClassVar[type[LowRankConfig]]
    data: ClassVar[PassData] = PassData.CALIBRATION
    resumable: ClassVar[bool] = False

    def can_stream(self, config: LowRankConfig) -> bool:
        return False

    def measures(self, config: LowRankConfig) -> bool:
        """Whether ``plan`` measures the model on the data: work a rerun of a streamed run should reuse."""
        return False

    def plan(
        self,
        model: nn.Module,
        config: LowRankConfig,
        data: Any,
        progress: bool = True,
        *,
        weights: WeightSource | None = None,
        scratch: Path | None = None,
    ) -> RankPlan:
        raise NotImplementedError

    def check(self, config: LowRankConfig, plan: RankPlan, data: Any) -> None:
        """Refuse data that cannot support the plan (nothing to check by default)."""

    def apply(
        self,
        model: nn.Module,
        config: LowRankConfig,
        data: Any,
        plan: RankPlan,
        *,
        progress: bool = True,
        stream: BlockStream | None = None,
        work_dir: Path | None = None,
    ) -> None:
        raise NotImplementedError
