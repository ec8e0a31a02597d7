"""JSON-serializable configs of the compression passes."""

from .base import HealingSpec, LowRankConfig
from .basis_selection import BasisSelectionConfig
from .rom import RomConfig
from .svd import SvdConfig

__all__ = ["BasisSelectionConfig", "HealingSpec", "LowRankConfig", "RomConfig", "SvdConfig"]
