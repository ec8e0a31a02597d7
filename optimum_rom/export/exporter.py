"""``export_onnx``: a (factorized) causal LM -> an onnxruntime-ready directory, checked against PyTorch.

The directory is what ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained`` expects
(``model.onnx`` with KV cache inputs/outputs, ``config.json``, ``generation_config.json``, the
tokenizer) and is written atomically. Before it is published, the graph's logits are compared
with the PyTorch model's on a prompt and one cached decoding step, and every factorized linear is
checked to still be two thin MatMuls.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from transformers import PreTrainedModel

from ..checkpoint import atomic_directory, check_output_dir
from ..checkpoint_format import factorized_ranks
from ..model_sources import load_model
from .decoder_graph import UnsupportedArchitectureError, build_decoder_graph, check_supported
from .inspection import verify_factorized
from .weights import (
    BITS,
    BLOCK_SIZE,
    WEIGHT_FORMATS,
    check_weight_options,
    quantize_dynamic_with_ort_quantizer,
    quantize_weights,
)

GRAPHS = ("auto", "fused", "optimum")
ONNX_FILE = "model.onnx"
# Protobuf cannot hold more than 2 GB: larger models keep their weights in one side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# What catches a broken graph. fp32 must reproduce PyTorch: largest |logit difference| relative to
# the largest |logit| (they agree to ~1e-6). Quantized weights move every logit a little and a few
# a lot, so there the RMS of the difference relative to the RMS of the logits is bounded: a wrong
# layout or scale gives 1 or more. int4 on a heavily compressed model is near that on 12 random
# tokens (SmolLM2 ROM 0.5: 0.59, a better perplexity than an earlier export's at 0.43), so it is only
# bounded below that.
FP32_TOLERANCE = 1e-3
RMS_TOLERANCE = {"int8": 0.1, "int4": 0.9, "int8-dynamic": 1.0}
VALIDATION_TOKENS = 12


@dataclass
class OnnxExportReport:
    """What an export produced, for logs, the CLI and benchmarks."""

    path: Path
    graph: str  # "fused" (our graph) or "optimum" (the stock exporter's)
    weights: str  # one of WEIGHT_FORMATS
    block_size: int | None  # inputs per quantization block of the weight-only formats
    onnx_bytes: int
    factorized_linears: int
    logits_max_abs_diff: float  # vs the PyTorch model on a validation prompt
    logits_max_abs: float
    logits_relative_rms: float  # RMS of the difference / RMS of the PyTorch logits
    seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def export_onnx(
    model: PreTrainedModel | str | Path,
    output: str | Path,
    *,
    tokenizer=None,
    weights: str = "fp32",
    block_size: int = BLOCK_SIZE,
    embedding_bits: int = 8,
    graph: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> OnnxExportReport:
    """Export a causal LM (dense or factorized; a model object, HF directory, ``.gguf`` or known alias).

    Args:
        weights: ``"fp32"``, ``"int8"`` / ``"int4"`` (weight-only MatMulNBits, one scale per
            ``block_size`` inputs) or ``"int8-dynamic"`` (optimum's ORTQuantizer, dynamic per-tensor
            activations); see :mod:`.weights`.
        embedding_bits: bits of the embedding table (and a tied lm_head) in the weight-only formats:
            8 keeps them at 8 bits under ``int4`` linears (the table is the most sensitive weight of
            a small model), 4 quantizes them like the linears.
        graph: ``"fused"`` builds onnxruntime fused-kernel graph (:mod:`.decoder_graph`), ``"optimum"``
            runs the stock ``optimum-cli export onnx`` exporter, ``"auto"`` takes the fused graph when
            the architecture is supported and the stock one otherwise.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    check_weight_options(BITS.get(weights, 8), block_size, embedding_bits)  # before any work
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or model
    output = check_output_dir(output, overwrite, inputs=[source if isinstance(source, (str, Path)) else None])
    model, loaded_tokenizer = load_model(model)
    if model.dtype != torch.float32:
        raise ValueError(
            f"the model is {model.dtype}; export a float32 model (model.float(), or load it in float32)"
        )
    tokenizer = tokenizer or loaded_tokenizer
    graph = _choose_graph(model, graph)

    started = time.perf_counter()
    with atomic_directory(output, overwrite) as partial:
        if graph == "fused":
            onnx_model = build_decoder_graph(model, progress, gemm_bias=weights != "int8-dynamic")
        else:
            onnx_model = _stock_export(model, partial)
        if weights in BITS:
            onnx_model = quantize_weights(onnx_model, BITS[weights], block_size, embedding_bits, progress)
        _save_onnx(onnx_model, partial / ONNX_FILE, graph, weights)
        del onnx_model
        _save_configs(model, tokenizer, partial, source)
        if weights == "int8-dynamic":
            quantize_dynamic_with_ort_quantizer(partial, partial)
        ranks = factorized_ranks(model)
        verify_factorized(partial / ONNX_FILE, ranks)
        difference, scale, relative_rms = compare_with_pytorch(partial, model)
        broken = (
            difference > FP32_TOLERANCE * max(1.0, scale)
            if weights == "fp32"
            else relative_rms > RMS_TOLERANCE[weights]
        )
        if broken:
            raise RuntimeError(
                f"the exported {graph} {weights} graph does not reproduce the PyTorch logits (max |difference| "
                f"{difference:.3g} for logits up to {scale:.3g}, relative RMS {relative_rms:.3g}); this is a "
                "bug, please report it"
            )
        onnx_bytes = sum(f.stat().st_size for f in partial.glob(f"{ONNX_FILE}*"))
    return OnnxExportReport(
        path=output,
        graph=graph,
        weights=weights,
        block_size=block_size if weights in BITS else None,
        onnx_bytes=onnx_bytes,
        factorized_linears=len(ranks),
        logits_max_abs_diff=difference,
        logits_max_abs=scale,
        logits_relative_rms=relative_rms,
        seconds=time.perf_counter() - started,
    )


def _choose_graph(model: PreTrainedModel, graph: str) -> str:
    if graph == "optimum":
        return graph
    try:
        check_supported(model)
    except UnsupportedArchitectureError as reason:
        if graph == "fused":
            raise
        print(f"optimum-rom: using the stock optimum exporter ({reason})")
        return "optimum"
    return "fused"


def _stock_export(model: PreTrainedModel, directory: Path) -> onnx.ModelProto:
    """The stock ``optimum-cli export onnx`` path (KV cache, optimum's post-processing), loaded back."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow
        onnx_export_from_model(model, directory, task="text-generation-with-past", do_validation=False)
    onnx_model = onnx.load(str(directory / ONNX_FILE))
    for side_file in directory.glob(f"{ONNX_FILE}?*"):
        side_file.unlink()  # weights are back in memory; _save_onnx decides how to store them
    return onnx_model


def _save_onnx(onnx_model: onnx.ModelProto, path: Path, graph: str, weights: str) -> None:
    onnx.helper.set_model_props(onnx_model, {"optimum_rom.graph": graph, "optimum_rom.weights": weights})
    weight_bytes = sum(len(init.raw_data) for init in onnx_model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            onnx_model,
            str(path),
            save_as_external_data=True,
            location=f"{path.name}_data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(onnx_model, str(path))


def _save_configs(model: PreTrainedModel, tokenizer, directory: Path, source) -> None:
    config = copy.deepcopy(model.config)
    config.use_cache = True  # the graph has KV cache inputs and outputs
    # The PyTorch model this graph reproduces: the chat task's reference for an export of a dense model.
    if isinstance(source, (str, Path)) and str(source):
        config.exported_from = str(Path(source).resolve()) if Path(source).exists() else str(source)
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def compare_with_pytorch(directory: Path, model: PreTrainedModel) -> tuple[float, float, float]:
    """``(max |logit difference|, max |logit|, relative RMS difference)`` between the exported
    directory and ``model``.

    The export is run through ``ORTModelForCausalLM``, as users run it: a prompt with an empty KV
    cache, then one more token with the cache it returned, so the cached decoding path is checked too.
    """
    from optimum.onnxruntime import ORTModelForCausalLM

    exported = ORTModelForCausalLM.from_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, VALIDATION_TOKENS), generator=generator)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        prompt = exported(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = exported(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=prompt.past_key_values)
    logits = torch.cat([prompt.logits, step.logits], dim=1).float()
    difference = logits - reference
    relative_rms = float(
        difference.square().mean().sqrt() / reference.square().mean().sqrt().clamp_min(1e-12)
    )
    return float(difference.abs().max()), float(reference.abs().max()), relative_rms


def is_onnx_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ONNX_FILE).is_file()


def load_onnx_model(path: str | Path):
    """``(ORTModelForCausalLM, tokenizer)`` of an exported directory; same calls as a PyTorch model."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    return ORTModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


__all__ = [
    "GRAPHS",
    "OnnxExportReport",
    "compare_with_pytorch",
    "export_onnx",
    "is_onnx_model_dir",
    "load_onnx_model",
]
