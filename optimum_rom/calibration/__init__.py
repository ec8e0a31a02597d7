"""Calibration data and the block-by-block walker the passes share."""

from .data import load_calibration
from .statistics import LinearStatistics, Moments, collect_block_statistics, shared_input_groups
from .walker import BlockStep, walk_blocks

__all__ = [
    "BlockStep",
    "LinearStatistics",
    "Moments",
    "load_calibration",
    "collect_block_statistics",
    "shared_input_groups",
    "walk_blocks",
]
