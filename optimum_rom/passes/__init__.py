"""The compression passes, one home per method, each a :class:`CompressionPass` found by ``quant_method``."""

from __future__ import annotations

from ..configs import LowRankConfig
from .base import CompressionPass, PassData
from .basis_selection import BasisSelectionPass
from .rom import RomPass
from .svd import SvdPass

PASSES: dict[str, type[CompressionPass]] = {
    method.config_class.quant_method: method for method in (RomPass, SvdPass, BasisSelectionPass)
}


def pass_for(config: LowRankConfig) -> CompressionPass:
    """The pass that serves ``config`` (a subclass of a pass's config is served by that pass)."""
    method = PASSES.get(config.quant_method)
    if method is None or not isinstance(config, method.config_class):
        names = [m.config_class.__name__ for m in PASSES.values()]
        raise TypeError(f"no compression pass for {type(config).__name__}; use one of {names}")
    return method()


__all__ = ["PASSES", "CompressionPass", "PassData", "pass_for"]
