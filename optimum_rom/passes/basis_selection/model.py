"""Model-level steps of Basis Selection: which linears, their final ranks, swapping layers in and out.

The final rank of a matrix is ``kept SVD bases + new bases``; the ranks come from the same
allocation as ROM's uniform mode, so the result hits ``params_ratio`` (embeddings included,
tied weights counted once).
"""

from __future__ import annotations

import math
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ...allocation import RankPlan, model_ratio, plan_uniform
from ...calibration import collect_block_statistics, walk_blocks
from ...configs import BasisSelectionConfig
from ...integrations.peft import merge_adapters
from ...structure import LinearSite, count_parameters, find_blocks, find_linear_sites, set_module
from .layer import BasisLinear


def plan_basis_selection(
    model: nn.Module, config: BasisSelectionConfig, data: object = None, progress: bool = True
) -> RankPlan:
    """Final rank of every linear (kept + new bases) for the size target (no training needed)."""
    sites = find_linear_sites(model, config.target_modules)
    head = untied_output_head(model) if config.include_lm_head else None
    if head is not None:
        sites.append(head)
    return plan_uniform(sites, count_parameters(model), model_ratio(config, model), with_bias=False)


def untied_output_head(model: nn.Module) -> LinearSite | None:
    """The output head as a site, unless it shares its weight with the input embeddings.

    Factorizing a tied head would untie it: the embedding matrix stays for the input and the
    factors come on top, so the model grows instead of shrinking.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight is head.weight:
        return None
    name = next(name for name, module in model.named_modules() if module is head)
    num_blocks = len(find_blocks(model)[1])
    return LinearSite(name, num_blocks, head.in_features, head.out_features, head.bias is not None)


def new_bases_ranks(final_ranks: dict[str, int], new_rank: int) -> dict[str, int]:
    """New bases per matrix: ``new_rank``, but at most half of a small final rank (0: none)."""
    return {name: min(new_rank, rank // 2) for name, rank in final_ranks.items()}


def attach_basis_layers(
    model: nn.Module, names: list[str], windows: torch.Tensor | None, progress: bool = True
) -> dict[str, BasisLinear]:
    """Replace each named linear by a :class:`BasisLinear` over all its bases (the same function).

    With token ``windows`` of the target data, the bases of the linears inside the decoder blocks
    are activation-aware (:meth:`BasisLinear.from_output_basis`, statistics gathered block by
    block with the walker ROM uses); otherwise, and for the output head, they are plain SVD bases.
    """
    layers: dict[str, BasisLinear] = {}
    if windows is not None:
        block_of = {site.name: site.block for site in find_linear_sites(model)}
        by_block: dict[int, list[str]] = {}
        for name in names:
            if name in block_of:
                by_block.setdefault(block_of[name], []).append(name)
        with torch.no_grad():
            for step in walk_blocks(model, windows, desc="bases", progress=progress):
                linears = {name: model.get_submodule(name) for name in by_block.get(step.index, [])}
                if not linears:
                    continue
                stats = collect_block_statistics(step, linears)
                for name, linear in linears.items():
                    layers[name] = BasisLinear.from_output_basis(linear, stats[name])
                    set_module(model, name, layers[name])
    for name in names:
        if name not in layers:
            layers[name] = BasisLinear.from_linear(model.get_submodule(name))
            set_module(model, name, layers[name])
    return layers


def token_windows(examples: list[dict[str, torch.Tensor]], count: int, seq_len: int) -> torch.Tensor:
    """Up to ``count`` windows of ``seq_len`` tokens cut from the training examples laid end to end."""
    stream = torch.cat([example["input_ids"] for example in examples])
    seq_len = min(seq_len, len(stream))
    count = max(1, min(count, len(stream) // seq_len))
    return stream[: count * seq_len].view(count, seq_len)


def add_new_bases(model: nn.Module, ranks: dict[str, int], layers: dict[str, BasisLinear]) -> PeftModel:
    """New LoRA bases on the basis layers (PEFT, one factor zero-initialized), coefficients trainable.

    PEFT marks only adapter weights trainable, so the coefficient roots are switched back on.
    """
    targets = [name for name, rank in ranks.items() if rank > 0]
    default = max(ranks.values(), default=1)
    exceptions = {name: ranks[name] for name in targets if ranks[name] != default}
    config = LoraConfig(
        r=default,
        lora_alpha=default,  # scaling 1: the learning rate alone sets the step
        target_modules=targets,
        rank_pattern={re.escape(name): rank for name, rank in exceptions.items()},
        alpha_pattern={re.escape(name): rank for name, rank in exceptions.items()},
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    for layer in layers.values():
        layer.coefficient_root.requires_grad_(True)
    return peft_model


def kept_bases(full: int, target: int, round_index: int, num_rounds: int) -> int:
    """Bases a matrix keeps in round ``round_index`` (1..num_rounds): the cubic schedule of
    gradual pruning (Zhu & Gupta 2017), ``target + (full - target) * (1 - t / N)^3``."""
    remaining = (1 - round_index / num_rounds) ** 3
    return target + math.ceil((full - target) * remaining)


def merge_into_factorized(peft_model: PeftModel, layers: dict[str, BasisLinear]) -> nn.Module:
    """Merge the new bases into the kept ones (PEFT merge) and re-factorize each into a FactorizedLinear."""
    model = merge_adapters(peft_model)
    for name, layer in layers.items():
        set_module(model, name, layer.to_factorized())
    return model
