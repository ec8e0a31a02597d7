"""Turning a global ``params_ratio`` into a rank per linear.

The paper's rule gives each matrix a parameter budget ``k`` (fraction of its parameters kept)
and the rank ``r = int(k * d_in * d_out / (d_in + d_out))``. We search ``k`` so that the whole
model lands on the requested fraction of parameters; a matrix is only factorized when that
saves parameters (the ``up`` bias counted).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import factorized_parameter_count
from .structure import LinearSite, count_parameters, decoder_linear_parameters, find_blocks, find_linear_sites


class UnreachableTargetError(ValueError):
    """The requested size cannot be reached with the chosen allocation."""


@dataclass
class RankPlan:
    """The outcome of an allocation: which linears get which rank, and the resulting size."""

    ranks: dict[str, int]
    total_params: int
    kept_params: int
    budget: float  # per-matrix parameter budget k (the largest one for non-uniform plans)
    blocks: list[int]
    # the directory of the measured loss-gradient covariances a Fisher-metric or scored ROM fits with
    # (optimum_rom.calibration.gradients.covariance_file), kept until the plan is applied
    fisher: str | None = None

    @property
    def ratio(self) -> float:
        return self.kept_params / self.total_params


def rank_for_budget(budget: float, in_features: int, out_features: int) -> int:
    """The paper's rank for a per-matrix budget ``k``: ``int(k * d_in * d_out / (d_in + d_out))``, at least 1."""
    return max(1, int(budget * in_features * out_features / (in_features + out_features)))


def site_params(site: LinearSite, rank: int | None, with_bias: bool) -> int:
    """Parameters of ``site`` at ``rank`` (``None`` = dense)."""
    if rank is None:
        return site.dense_params
    return factorized_parameter_count(site.in_features, site.out_features, rank, bias=with_bias or site.bias)


def saves_parameters(site: LinearSite, rank: int, with_bias: bool) -> bool:
    return site_params(site, rank, with_bias) < site.dense_params


def model_ratio(config, model: nn.Module) -> float:
    """``config.params_ratio`` as a fraction of the whole model, which the plans below target.

    Of the decoder linears (``ratio_of="linears"``): keeping ``r`` of ``L`` linear parameters out of
    ``T`` keeps ``1 - (1 - r) * L / T`` of the model, since every removed parameter is a linear's.
    """
    if config.ratio_of == "model":
        return config.params_ratio
    linears = decoder_linear_parameters(model)
    return 1 - (1 - config.params_ratio) * linears / count_parameters(model)


def kept_ratios(model: nn.Module, plan: RankPlan) -> dict[str, float]:
    """The plan's size in both accountings: of the whole model and of the decoder linears.

    The parameters a plan removes are the factorized linears' (an lm_head that Basis Selection
    factorizes is counted with the decoder linears here).
    """
    linears = decoder_linear_parameters(model)
    removed = plan.total_params - plan.kept_params
    return {"model": plan.ratio, "linears": (linears - removed) / linears}


def plan_uniform(
    sites: list[LinearSite],
    total_params: int,
    params_ratio: float,
    with_bias: bool,
    blocks: Iterable[int] | None = None,
) -> RankPlan:
    """Give every eligible linear the same per-matrix budget ``k``, the largest that fits the target."""
    eligible = [s for s in sites if blocks is None or s.block in set(blocks)]
    fixed = total_params - sum(s.dense_params for s in eligible)
    target = params_ratio * total_params

    def plan_at(budget: float) -> tuple[dict[str, int], int]:
        ranks, kept = {}, fixed
        for site in eligible:
            rank = rank_for_budget(budget, site.in_features, site.out_features)
            if saves_parameters(site, rank, with_bias):
                ranks[site.name] = rank
                kept += site_params(site, rank, with_bias)
            else:
                kept += site.dense_params
        return ranks, kept

    if total_params <= target:  # nothing to remove
        return RankPlan({}, total_params, total_params, 1.0, [])
    _, smallest = plan_at(0.0)
    if smallest > target:
        raise UnreachableTargetError(
            f"params_ratio={params_ratio} is out of reach: with every compressible linear at rank 1 the model "
            f"still keeps {smallest / total_params:.1%} of its parameters (embeddings, norms and untouched layers "
            f"are {fixed / total_params:.1%}). Choose params_ratio >= {smallest / total_params:.3f}"
            + (" or compress more blocks." if blocks is not None else ".")
        )
    low, high = 0.0, 1.0
    if plan_at(high)[1] <= target:
        low = high
    else:
        for _ in range(60):
            middle = (low + high) / 2
            if plan_at(middle)[1] <= target:
                low = middle
            else:
                high = middle
    ranks, kept = plan_at(low)
    kept = _spend_leftover(ranks, eligible, kept, target, with_bias)
    return RankPlan(ranks, total_params, kept, low, sorted({s.block for s in eligible}))


def _spend_leftover(
    ranks: dict[str, int], eligible: list[LinearSite], kept: int, target: float, with_bias: bool
) -> int:
    """Give the budget the rounding of ``k`` left unused back as +1 ranks, one matrix at a time.

    On small models one step of ``k`` moves every rank at once, which can leave the plan more
    than 1% under target; this keeps every matrix within one rank of the uniform budget.
    """
    grown = True
    while grown:
        grown = False
        for site in reversed(eligible):
            rank = ranks.get(site.name)
            if rank is None or not saves_parameters(site, rank + 1, with_bias):
                continue
            step = site.in_features + site.out_features
            if kept + step <= target:
                ranks[site.name] = rank + 1
                kept += step
                grown = True
    return kept


def plan_trailing(
    sites: list[LinearSite],
    total_params: int,
    params_ratio: float,
    with_bias: bool,
    num_blocks: int,
    num_trailing_blocks: int | None = None,
) -> RankPlan:
    """The paper's allocation: only the last ``num_trailing_blocks`` blocks are compressed, uniformly.

    Without an explicit count, take as many trailing blocks as needed for each compressed
    matrix to keep about half its parameters (the paper's 80% LLaMA-7B setting: 12 of 32 blocks at 0.46).
    """
    if num_trailing_blocks is None:
        removed = total_params * (1 - params_ratio)
        last_block = max(s.block for s in sites)
        per_block = sum(s.dense_params for s in sites if s.block == last_block)
        num_trailing_blocks = min(num_blocks, max(1, round(removed / (0.5 * per_block))))
    elif num_trailing_blocks > num_blocks:
        raise UnreachableTargetError(
            f"num_trailing_blocks={num_trailing_blocks} but the model has only {num_blocks} blocks"
        )
    blocks = range(num_blocks - num_trailing_blocks, num_blocks)
    return plan_uniform(sites, total_params, params_ratio, with_bias, blocks=blocks)


def plan_by_damage(
    sites: list[LinearSite],
    total_params: int,
    params_ratio: float,
    with_bias: bool,
    damage: dict[str, torch.Tensor],
) -> RankPlan:
    """Spend the parameter budget where it removes the most damage.

    ``damage[name][r]`` estimates what keeping rank ``r`` of that linear costs the model (it
    decreases with ``r``; keeping the matrix dense costs nothing). Starting from rank 1
    everywhere, the budget goes, one rank at a time, to the linear whose next rank removes the
    most damage per parameter; once a rank no longer saves parameters, the next step is to
    keep that matrix dense. With decreasing marginal gains this greedy order is optimal up to
    the last rank.
    """
    target = params_ratio * total_params
    if total_params <= target:
        return RankPlan({}, total_params, total_params, 1.0, [])
    ranks = {site.name: 1 for site in sites}
    kept = (
        total_params - sum(s.dense_params for s in sites) + sum(site_params(s, 1, with_bias) for s in sites)
    )
    if kept > target:
        raise UnreachableTargetError(
            f"params_ratio={params_ratio} is out of reach: with every compressible linear at rank 1 the model "
            f"still keeps {kept / total_params:.1%} of its parameters. Choose params_ratio >= "
            f"{kept / total_params:.3f}."
        )
    dense: set[str] = set()
    moves: list[
        tuple[float, int, str, int, bool]
    ] = []  # (-gain per parameter, order, name, cost, goes dense)

    def offer(site: LinearSite) -> None:
        rank, curve = ranks[site.name], damage[site.name]
        goes_dense = rank + 1 >= len(curve) or site_params(site, rank + 1, with_bias) >= site.dense_params
        if goes_dense:  # keeping the matrix dense removes all the damage that is left
            extra = site.dense_params - site_params(site, rank, with_bias)
            gain = float(curve[min(rank, len(curve) - 1)])
        else:
            extra = site.in_features + site.out_features
            gain = float(curve[rank] - curve[rank + 1])
        heapq.heappush(moves, (-gain / max(extra, 1), len(moves), site.name, extra, goes_dense))

    by_name = {site.name: site for site in sites}
    for site in sites:
        offer(site)
    while moves:
        _, _, name, extra, goes_dense = heapq.heappop(moves)
        if kept + extra > target:
            continue
        kept += extra
        if goes_dense:
            dense.add(name)
        else:
            ranks[name] += 1
            offer(by_name[name])
    factorized = {name: rank for name, rank in ranks.items() if name not in dense}
    return RankPlan(factorized, total_params, kept, 0.0, sorted({s.block for s in sites}))


def plan_model(
    model: nn.Module,
    params_ratio: float,
    with_bias: bool,
    allocation: str = "uniform",
    target_modules: list[str] | None = None,
    num_trailing_blocks: int | None = None,
) -> RankPlan:
    """Ranks for every targeted linear of ``model`` under an allocation mode (``"uniform"`` or ``"paper"``)."""
    sites = find_linear_sites(model, target_modules)
    total = count_parameters(model)
    if allocation == "paper":
        num_blocks = len(find_blocks(model)[1])
        return plan_trailing(sites, total, params_ratio, with_bias, num_blocks, num_trailing_blocks)
    return plan_uniform(sites, total, params_ratio, with_bias)
