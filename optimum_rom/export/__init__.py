"""ONNX export of (factorized) causal LMs for onnxruntime, with optional int8 / int4 weights.

``export_onnx`` writes a directory that ``optimum.onnxruntime.ORTModelForCausalLM`` loads; the
stock ``optimum-cli export onnx`` also exports factorized checkpoints once ``optimum_rom`` is
imported (optimum-cli's register file does that for ``export``).
"""

from .decoder_graph import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, build_decoder_graph
from .exporter import GRAPHS, OnnxExportReport, export_onnx, is_onnx_model_dir, load_onnx_model
from .inspection import linear_weights, verify_factorized
from .weights import WEIGHT_FORMATS, quantize_blockwise, quantize_weights

__all__ = [
    "GRAPHS",
    "SUPPORTED_MODEL_TYPES",
    "OnnxExportReport",
    "UnsupportedArchitectureError",
    "build_decoder_graph",
    "export_onnx",
    "is_onnx_model_dir",
    "linear_weights",
    "load_onnx_model",
    "quantize_blockwise",
    "quantize_weights",
    "verify_factorized",
    "WEIGHT_FORMATS",
]
