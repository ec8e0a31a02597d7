"""Resuming an interrupted Basis Selection run from its last completed round.

After every round the work directory receives what the round changed: the kept SVD bases and
the coefficient roots of every layer, and the new bases. The SVD bases themselves are not
stored (they are recomputed from the model). A fingerprint of the model, the config and the
training data guards against resuming a different run: mismatching state is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...configs import BasisSelectionConfig
from .layer import BasisLinear

logger = logging.getLogger(__name__)

STATE_JSON = "state.json"


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
    work_dir: Path,
    fingerprint: str,
    completed: int,
    layers: dict[str, BasisLinear],
    new_bases: dict[str, torch.Tensor],
) -> None:
    """Record that ``completed`` rounds are done; the JSON is written last, so it only ever names complete files."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.basis_ids"] = layer.basis_ids.contiguous()
        tensors[f"{name}.coefficient_root"] = layer.coefficient_root.detach().contiguous()
    tensors.update({f"new_bases.{k}": v.detach().contiguous() for k, v in new_bases.items()})
    weights = f"round-{completed}.safetensors"
    save_file(tensors, work_dir / weights)
    _write_json(
        work_dir / STATE_JSON, {"fingerprint": fingerprint, "completed": completed, "weights": weights}
    )
    for stale in work_dir.glob("round-*.safetensors"):
        if stale.name != weights:
            stale.unlink()


def load_round(work_dir: Path, fingerprint: str) -> tuple[int, dict[str, torch.Tensor]] | None:
    """``(completed rounds, tensors)`` of a previous run of the same job, or ``None``."""
    path = work_dir / STATE_JSON
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("fingerprint") != fingerprint:
        logger.warning(
            "ignoring the saved Basis Selection state in %s: it belongs to a different model, config or "
            "data set; starting from round 0",
            work_dir,
        )
        return None
    return state["completed"], load_file(work_dir / state["weights"])


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


def _write_json(path: Path, content: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, path)
