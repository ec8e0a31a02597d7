"""JSON-serializable configs of the compression passes."""

from .base import LowRankConfig
from .rom import RomConfig
from .svd import SvdConfig

__all__ = ["LowRankConfig", "RomConfig", "SvdConfig"]
