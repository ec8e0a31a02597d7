"""Layers produced by the compression passes."""

from .factorized_linear import FactorizedLinear, factorized_parameter_count

__all__ = ["FactorizedLinear", "factorized_parameter_count"]
