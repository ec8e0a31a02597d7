"""optimum-rom: low-rank compression of LLMs on a CPU (ROM and Basis Selection).

Importing the package registers it with transformers (``AutoModelForCausalLM.from_pretrained``
loads factorized checkpoints) and with PEFT (LoRA on factorized layers).
"""

from .calibration import ChatCalibration
from .configs import BasisSelectionConfig, LowRankConfig, RomConfig, SvdConfig
from .export import export_onnx
from .integrations.peft import LoraFactorizedLinear, install_peft_dispatch
from .integrations.transformers import LowRankHfQuantizer, is_factorized, register_with_transformers
from .layers import FactorizedLinear
from .model_sources import load_model
from .optimizer import CompressionReport, LowRankOptimizer
from .passes.basis_selection import BasisLinear

__version__ = "0.1.0"

register_with_transformers({"rom": RomConfig, "svd": SvdConfig, "basis_selection": BasisSelectionConfig})
install_peft_dispatch((FactorizedLinear, BasisLinear))  # the layers LoRA may target, by their dense names

__all__ = [
    "BasisSelectionConfig",
    "ChatCalibration",
    "CompressionReport",
    "FactorizedLinear",
    "LoraFactorizedLinear",
    "LowRankConfig",
    "LowRankHfQuantizer",
    "LowRankOptimizer",
    "RomConfig",
    "SvdConfig",
    "export_onnx",
    "is_factorized",
    "load_model",
]
