"""Finding the parts of a causal LM that the passes work on: its decoder blocks and their linears.

Works by structure, not by architecture name, so any transformers decoder whose blocks live
in one ``nn.ModuleList`` and whose projections are ``nn.Linear`` is supported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class LinearSite:
    """One linear layer the passes may factorize."""

    name: str  # full module name, e.g. "model.layers.3.mlp.up_proj"
    block: int  # index of the decoder block that holds it
    in_features: int
    out_features: int
    bias: bool

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


class UnsupportedModelError(ValueError):
    """The model has no structure the passes understand."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (e.g. ``model.layers``) and its name."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _has_linears(module[0])
    ]
    if expected is not None:
        exact = [c for c in candidates if len(c[1]) == expected]
        candidates = exact or candidates
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of decoder blocks containing nn.Linear layers; optimum-rom "
            "supports transformers decoder models whose blocks sit in an nn.ModuleList (Llama, Qwen2, "
            "Mistral, Gemma, Phi-3, OLMo, ...)."
        )
    return max(candidates, key=lambda c: len(c[1]))


def _has_linears(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def matches_target(name: str, target_modules: list[str] | None) -> bool:
    """PEFT's rule: a target matches the full name or a dotted suffix of it."""
    if target_modules is None:
        return True
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_linear_sites(model: nn.Module, target_modules: list[str] | None = None) -> list[LinearSite]:
    """Every ``nn.Linear`` inside the decoder blocks that ``target_modules`` selects, in block order."""
    blocks_name, blocks = find_blocks(model)
    sites = []
    for index, block in enumerate(blocks):
        for local_name, module in block.named_modules():
            name = f"{blocks_name}.{index}.{local_name}"
            if isinstance(module, nn.Linear) and matches_target(name, target_modules):
                sites.append(
                    LinearSite(name, index, module.in_features, module.out_features, module.bias is not None)
                )
    if target_modules is not None:
        _check_targets(model, blocks_name, target_modules, sites)
    return sites


def _check_targets(
    model: nn.Module, blocks_name: str, target_modules: list[str], sites: list[LinearSite]
) -> None:
    """Name the problem when a requested target is not a linear inside the blocks."""
    for target in target_modules:
        if any(matches_target(site.name, [target]) for site in sites):
            continue
        others = [
            f"{name} ({type(module).__name__})"
            for name, module in model.named_modules()
            if name and matches_target(name, [target])
        ]
        if others:
            raise UnsupportedModelError(
                f"target_modules entry {target!r} matches {', '.join(others[:3])}, which is not an nn.Linear "
                f"inside the decoder blocks ({blocks_name}); only those linears can be factorized."
            )
        raise UnsupportedModelError(
            f"target_modules entry {target!r} matches no module of {type(model).__name__}; use linear names "
            f"such as 'q_proj' or 'mlp.down_proj' from its decoder blocks."
        )


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def meta_model(model_config) -> nn.Module:
    """The architecture of ``model_config`` on the meta device (float32, tied weights tied): shapes
    and parameter counts without the weights."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.tie_weights()  # not done on the meta device by from_config; counts tied weights once
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once (``model.parameters()`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def check_compressible(model: nn.Module) -> None:
    """Refuse quantized, integer or already-factorized models with a message that says why."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None:
        method = (
            quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        )
        raise ValueError(
            f"the model is already compressed or quantized (quant_method={method!r}); optimum-rom compresses "
            "float weights: start from the original dense float16/bfloat16/float32 model"
        )
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            raise ValueError(f"{name} has {parameter.dtype} weights; optimum-rom needs float weights")


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights are offloaded (on the meta device, loaded by accelerate hooks).

    The passes read weights directly, not only through forward calls; streaming from the
    model's directory is optimum-rom's own offload, one block in memory at a time.
    """
    for name, parameter in model.named_parameters():
        if parameter.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device (offloaded): optimum-rom reads the weights themselves. Pass the "
                "model's directory instead (LowRankOptimizer.from_pretrained(path)); with save_dir the "
                "compression then streams it block by block from disk"
            )


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN or Inf weights before any work: otherwise they surface blocks later as NaN activations."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"the weight {name} contains NaN or Inf values: the model file is corrupted; restore the "
                "original model (download or save it again)"
            )


def decoder_linear_parameters(model: nn.Module) -> int:
    """Parameters of the linears inside the decoder blocks, dense or factorized (what papers count;
    :func:`count_parameters` counts the whole model). Works on models on the meta device."""
    _, blocks = find_blocks(model)
    return sum(
        parameter.numel()
        for block in blocks
        for module in block.modules()
        if isinstance(module, nn.Linear)
        for parameter in module.parameters(recurse=False)
    )
