"""The ROM pass: reduced-order modelling of each linear's output features.

For ``y = W x + b`` with calibration statistics of ``W x`` (mean ``mu``, covariance ``C``),
keep the top-``r`` eigenvectors ``V`` of ``C`` and re-parameterize

    y ~= V V^T (W x - mu) + mu + b  =  up(down(x))   with  down = V^T W,  up = V,
                                                          up.bias = b + (I - V V^T) mu.

Projecting mean-centred features and putting the mean back through the bias is what makes
the centred covariance of the paper exact (projecting raw features onto centred eigenvectors
loses the mean: perplexity explodes). Blocks are processed in order and each block sees the
outputs of the already-compressed blocks before it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import RankPlan, plan_model
from ..calibration.statistics import LinearStatistics, collect_block_statistics
from ..calibration.walker import walk_blocks
from ..configs import RomConfig
from ..layers import FactorizedLinear
from ..structure import find_linear_sites, set_module


def plan_rom(model: nn.Module, config: RomConfig) -> RankPlan:
    """Ranks for every linear, from the config's size target and allocation mode (no calibration needed)."""
    return plan_model(
        model,
        config.params_ratio,
        config.center,
        config.allocation,
        config.target_modules,
        config.num_trailing_blocks,
    )


def run_rom(
    model: nn.Module,
    config: RomConfig,
    input_ids: torch.Tensor,
    plan: RankPlan | None = None,
    progress: bool = True,
) -> RankPlan:
    """Compress ``model`` in place with ROM; return the plan that was applied."""
    plan = plan or plan_rom(model, config)
    by_block: dict[int, dict[str, int]] = {}
    for site in find_linear_sites(model, config.target_modules):
        if site.name in plan.ranks:
            by_block.setdefault(site.block, {})[site.name] = plan.ranks[site.name]
    with torch.no_grad():
        for step in walk_blocks(model, input_ids, desc="ROM", progress=progress):
            ranks = by_block.get(step.index)
            if not ranks:
                continue
            linears = {name: model.get_submodule(name) for name in ranks}
            stats = collect_block_statistics(step, linears)
            for name, rank in ranks.items():
                set_module(model, name, rom_factorize(linears[name], stats[name], rank, config.center))
    return plan


def rom_factorize(
    linear: nn.Linear, stats: LinearStatistics, rank: int, center: bool = True
) -> FactorizedLinear:
    """Replace one linear by its rank-``rank`` ROM factorization."""
    weight = linear.weight.detach().double()
    basis = principal_output_basis(weight, stats, rank, center)
    down = basis.T @ weight
    bias = None if linear.bias is None else linear.bias.detach().double()
    if center:
        mean = stats.output_mean(weight)
        correction = mean - basis @ (basis.T @ mean)
        bias = correction if bias is None else bias + correction
    dtype = linear.weight.dtype
    return FactorizedLinear.from_factors(
        down.to(dtype), basis.to(dtype), None if bias is None else bias.to(dtype)
    )


def principal_output_basis(
    weight: torch.Tensor, stats: LinearStatistics, rank: int, center: bool
) -> torch.Tensor:
    """Top-``rank`` eigenvectors (out x rank, float64) of the covariance of ``W x``."""
    if stats.site == "output":
        return top_eigenvectors(stats.second_moment(center), rank)
    out_features, in_features = weight.shape
    if out_features <= in_features:
        return top_eigenvectors(weight @ stats.second_moment(center) @ weight.T, rank)
    # Wide output (gate/up): Cov(Wx) = M M^T with M = W L and Cov(x) = L L^T. Its top eigenvectors
    # are M u / sqrt(lambda) for the top eigenpairs of the small in x in matrix M^T M.
    thin = weight @ stats.input_root(center)
    values, vectors = torch.linalg.eigh(thin.T @ thin)
    values, vectors = values[-rank:].flip(-1), vectors[:, -rank:].flip(-1)
    if values[-1] <= 1e-10 * values[0]:  # rank-deficient features: the SVD stays orthonormal
        return torch.linalg.svd(thin, full_matrices=False)[0][:, :rank]
    return (thin @ vectors) / values.sqrt()


def top_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(_symmetric(matrix))
    return vectors[:, -rank:].flip(-1)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2
