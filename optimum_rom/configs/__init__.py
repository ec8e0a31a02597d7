"""JSON-serializable configs of the compression passes."""

from .base import LowRankConfig
from .rom import RomConfig

__all__ = ["LowRankConfig", "RomConfig"]
