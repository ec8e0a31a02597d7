"""The model card (``README.md``) of every checkpoint optimum-rom saves.

Someone who finds the directory later, or on a model hub, learns from it what was done (method,
settings, ranks), how large the model is in both accountings people use (the whole model, as
``params_ratio`` counts it, and the decoder linears only, as papers count), which data calibrated
it, what was measured during the run, and that loading it needs the plugin.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from torch import nn

from .checkpoint import add_output_file
from .configs import LowRankConfig
from .structure import count_parameters, decoder_linear_parameters

METHODS = {
    "rom": "ROM: the top principal directions of each linear's outputs on calibration data "
    "(Chavan et al. 2023, https://arxiv.org/abs/2312.07046)",
    "svd": "truncated SVD of each weight (the data-free baseline)",
    "basis_selection": "Basis Selection: SVD bases selected by training on one application's data "
    "(Li et al., https://arxiv.org/abs/2405.15877)",
}


def write_model_card(directory: Path, config: LowRankConfig, model: nn.Module, report=None) -> None:
    """Add ``README.md`` to the finished checkpoint in ``directory``; ``report`` is the run's
    CompressionReport (``None`` when the model is saved without having been compressed here)."""
    add_output_file(directory, "README.md", model_card(directory.name, config, model, report))


def model_card(name: str, config: LowRankConfig, model: nn.Module, report=None) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k not in ("modules", "calibration")}
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [optimum-rom, low-rank, {config.quant_method}]",
        "---",
        "",
        f"# {name}",
        "",
        "A factorized (low-rank) model made with optimum-rom. Method: "
        f"{METHODS.get(config.quant_method, config.quant_method)}. Every factorized linear is two thin "
        "linears, `up(down(x))`.",
        "",
        "## Size",
        "",
        *_size_table(model, report),
        "",
        "## Ranks",
        "",
        *_rank_lines(config.modules),
        "",
        "## Calibration",
        "",
        _calibration_line(config),
        "",
    ]
    if report is not None:
        lines += ["## Measured during the run", "", *_measured_lines(report), ""]
    lines += [
        "## Loading",
        "",
        "It needs the optimum-rom plugin installed (`pip install optimum-rom`); then transformers loads "
        "it in any Python process, including tools that never import the plugin (lm-eval, pipelines, "
        "TRL):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        "Without the plugin, loading stops with an error that says to install it: never a dense model "
        "with random weights.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def _size_table(model: nn.Module, report) -> list[str]:
    after = (count_parameters(model), decoder_linear_parameters(model))
    before = (report.params_before, report.linear_params_before) if report is not None else None
    rows = ["| parameters | compressed | dense | ratio |", "|---|---:|---:|---:|"]
    labels = ("whole model (embeddings included, tied weights once)", "decoder linears only")
    for index, label in enumerate(labels):
        if before is None:
            rows.append(f"| {label} | {after[index]:,} | | |")
        else:
            rows.append(
                f"| {label} | {after[index]:,} | {before[index]:,} | {after[index] / before[index]:.3f} |"
            )
    return rows


def _rank_lines(modules: dict[str, int]) -> list[str]:
    by_kind: dict[str, list[int]] = defaultdict(list)
    for module, rank in modules.items():
        by_kind[module.rsplit(".", 1)[-1]].append(rank)
    lines = [f"{len(modules)} linears factorized.", ""]
    lines += ["| linear | factorized | rank min | median | max |", "|---|---:|---:|---:|---:|"]
    for kind, ranks in sorted(by_kind.items()):
        median = statistics.median(ranks)
        lines.append(f"| {kind} | {len(ranks)} | {min(ranks)} | {median:g} | {max(ranks)} |")
    return lines + ["", "Every rank is in `config.json` (`quantization_config.modules`)."]


def _calibration_line(config: LowRankConfig) -> str:
    if config.calibration is None:
        return "None: the method needs no data."
    return f"{config.calibration}: {config.num_samples} sequences of {config.seq_len} tokens, seed {config.seed}."


def _measured_lines(report) -> list[str]:
    lines = [
        f"- compression: {report.seconds:.1f} s ({'streamed from disk, one block in memory' if report.streamed else 'in memory'})",
        f"- parameters kept: {report.ratio:.3f} of the dense model, {report.linear_ratio:.3f} of its decoder "
        f"linears (target {report.target_ratio} of the {'whole model' if report.ratio_of == 'model' else 'decoder linears'})",
    ]
    if report.healing:
        healing = report.healing
        lines.append(
            f"- healing: {healing['steps']} steps on {healing['tokens']:,} tokens in {healing['seconds']:.0f} s, "
            f"loss {healing['first_loss']:.3f} -> {healing['last_loss']:.3f}"
        )
    return lines
