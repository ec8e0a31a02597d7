"""Resuming an interrupted Basis Selection run from its last completed round.

After every round the work directory receives what the round changed: the kept SVD bases and
the coefficient roots of every layer, and the new bases. The SVD bases themselves are not
stored (they are recomputed from the model). A fingerprint of the model, the config and the
training data guards against resuming a different run: mismatching state is ignored.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...checkpoint import WorkDir
from ...configs import BasisSelectionConfig
from .layer import BasisLinear


def run_fingerprint(
    model: nn.Module, config: BasisSelectionConfig, examples: list[dict[str, torch.Tensor]]
) -> str:
    """A hash of everything the rounds depend on: weights, architecture, config, training examples."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in config.to_dict().items() if k not in ("modules", "calibration")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(model.config.to_json_string().encode() if hasattr(model, "config") else b"")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}:{float(parameter.double().sum()):.10e}".encode())
    for example in examples:
        digest.update(example["input_ids"].numpy().tobytes())
        digest.update(example["labels"].numpy().tobytes())
    return digest.hexdigest()


def save_round(
    work: WorkDir, completed: int, layers: dict[str, BasisLinear], new_bases: dict[str, torch.Tensor]
) -> None:
    """Record that ``completed`` rounds are done; the journal is written last, so it only ever names
    complete files."""
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.basis_ids"] = layer.basis_ids.contiguous()
        tensors[f"{name}.coefficient_root"] = layer.coefficient_root.detach().contiguous()
    tensors.update({f"new_bases.{k}": v.detach().contiguous() for k, v in new_bases.items()})
    weights = f"round-{completed}.safetensors"
    save_file(tensors, work.path / weights)
    work.record(completed=completed, weights=weights)
    for stale in work.path.glob("round-*.safetensors"):
        if stale.name != weights:
            stale.unlink()


def load_round(work: WorkDir) -> tuple[int, dict[str, torch.Tensor]] | None:
    """``(completed rounds, tensors)`` of a previous run of the same job, or ``None``."""
    if not work.resumed:
        return None
    return work.progress["completed"], load_file(work.path / work.progress["weights"])


def restore_round(
    tensors: dict[str, torch.Tensor], layers: dict[str, BasisLinear], new_bases: dict[str, torch.Tensor]
) -> None:
    """Put the saved state into freshly built layers (all SVD bases still present)."""
    with torch.no_grad():
        for name, layer in layers.items():
            layer.select(tensors[f"{name}.basis_ids"].to(layer.left.device))
            layer.coefficient_root.copy_(tensors[f"{name}.coefficient_root"])
        for key, parameter in new_bases.items():
            parameter.copy_(tensors[f"new_bases.{key}"])
