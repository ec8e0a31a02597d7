"""Calibration data and the block-by-block walker the passes share."""

from .data import CalibrationSet, ChatCalibration, load_calibration
from .statistics import LinearStatistics, Moments, collect_block_statistics, shared_input_groups
from .walker import BlockStep, walk_blocks

__all__ = [
    "BlockStep",
    "CalibrationSet",
    "ChatCalibration",
    "LinearStatistics",
    "Moments",
    "load_calibration",
    "collect_block_statistics",
    "shared_input_groups",
    "walk_blocks",
]
