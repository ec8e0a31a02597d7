"""Basis Selection (Li et al., "Basel"): application-specific low-rank compression.

``layer`` holds the training-time layer (SVD bases with trainable coefficients), ``model`` the
model-level steps (sites and ranks, new bases with PEFT, merging), ``training`` the CPU training
loop, ``state`` resuming, and ``run`` the pass itself.
"""

from .layer import BasisLinear
from .model import plan_basis_selection
from .run import BasisSelectionPass, run_basis_selection

__all__ = ["BasisLinear", "BasisSelectionPass", "plan_basis_selection", "run_basis_selection"]
