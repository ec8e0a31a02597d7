"""The ROM pass: reduced-order modelling of each linear's output features.

For ``y = W x + b`` with calibration statistics of ``W x`` (mean ``mu``, covariance ``C``),
keep the top-``r`` eigenvectors ``V`` of ``C`` and re-parameterize

    y ~= V V^T (W x - mu) + mu + b  =  up(down(x))   with  down = V^T W,  up = V,
                                                          up.bias = b + (I - V V^T) mu.

Projecting mean-centred features and putting the mean back through the bias is what makes
the centred covariance of the paper exact (projecting raw features onto centred eigenvectors
loses the mean: perplexity explodes). Blocks are processed in order and each block sees the
outputs of the already-compressed blocks before it.

With the Fisher metric (``metric="fisher"``) the error is measured as the loss feels it: with
``G = R R^T`` the (damped) covariance of the loss gradient at the output, the expected loss
increase of an output error ``e`` is ``E[e^T G e]`` to second order, minimized by the same PCA
done on ``R^T W x``: ``V`` its top eigenvectors, ``down = V^T R^T W``, ``up = R^-T V``.
With the scored metric (``metric="scored"``) the basis stays the features' own eigenvectors and
the kept ones are those whose dropping would cost the most, ``lambda_i u_i^T G u_i``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..allocation import RankPlan, model_ratio, plan_by_damage, plan_model
from ..calibration.data import CalibrationSet
from ..calibration.gradients import load_covariances
from ..calibration.sensitivity import measure_damage
from ..calibration.statistics import CrossMoments, LinearStatistics, collect_block_statistics
from ..calibration.walker import BlockStep, BlockStream, WeightSource, walk_blocks
from ..configs import RomConfig
from ..layers import FactorizedLinear
from ..linalg import fisher_root, top_left_singular_vectors
from ..precision import factorization_dtype
from ..refinement import refine_block
from ..structure import count_parameters, find_linear_sites, set_module
from .base import CompressionPass


def plan_rom(
    model: nn.Module,
    config: RomConfig,
    data: CalibrationSet | None = None,
    progress: bool = True,
    weights: WeightSource | None = None,
    scratch: Path | None = None,
) -> RankPlan:
    """Ranks for every linear, from the config's size target and allocation mode.

    ``"adaptive"`` measures every linear's damage curve on ``data`` first (a dense pass, block by
    block, reading each block from ``weights`` if the model is on the meta device; see
    optimum_rom.calibration.sensitivity); the other modes need no data. With the Fisher or scored
    metric the measured gradient covariances are kept in ``scratch`` for :func:`run_rom` (the plan
    names them).
    """
    if config.allocation == "adaptive":
        if data is None:
            raise ValueError("allocation='adaptive' measures the model on calibration data: pass data")
        covariances = None
        if config.metric != "features":
            if scratch is None:
                raise ValueError(
                    f"metric={config.metric!r} keeps the measured gradient covariances on disk: pass scratch"
                )
            covariances = Path(scratch) / "gradient-covariances"
            covariances.mkdir(parents=True, exist_ok=True)
        sites = find_linear_sites(model, config.target_modules)
        damage = measure_damage(
            model,
            data,
            sites,
            config.center,
            progress,
            weights,
            scratch,
            scoring=config.scoring,
            covariances=covariances,
            ranked=config.metric == "scored",
            precision=config.calibration_precision,
            dtype=factorization_dtype(config.factorization_precision),
        )
        plan = plan_by_damage(
            sites, count_parameters(model), model_ratio(config, model), config.center, damage
        )
        plan.fisher = None if covariances is None else str(covariances)
        return plan
    return plan_model(
        model,
        model_ratio(config, model),
        config.center,
        config.allocation,
        config.target_modules,
        config.num_trailing_blocks,
    )


def run_rom(
    model: nn.Module,
    config: RomConfig,
    data: CalibrationSet,
    plan: RankPlan | None = None,
    progress: bool = True,
    stream: BlockStream | None = None,
) -> RankPlan:
    """Compress ``model`` in place with ROM; return the plan that was applied.

    With a ``stream`` the blocks are loaded and saved one at a time (see optimum_rom.streaming).
    """
    plan = plan or plan_rom(model, config, data, progress)
    by_block: dict[int, dict[str, int]] = {}
    for site in find_linear_sites(model, config.target_modules):
        if site.name in plan.ranks:
            by_block.setdefault(site.block, {})[site.name] = plan.ranks[site.name]
    if plan.fisher and not Path(plan.fisher).is_dir():
        raise FileNotFoundError(
            f"the plan's gradient covariances are gone ({plan.fisher}): a Fisher-metric plan is applied "
            "in the run that measured it; measure it again (rerun the compression)"
        )
    # the dense model's own stream: the targets of error-correcting fits and of anchored refinement
    reference = config.target == "dense" or (config.refine_epochs > 0 and config.refine_target == "dense")
    with torch.no_grad():
        for step in walk_blocks(
            model,
            data.input_ids,
            desc="ROM",
            progress=progress,
            stream=stream,
            reference=reference,
            precision=config.calibration_precision,
        ):
            if step.index in by_block:
                _compress_block(
                    model, step, by_block[step.index], config, _gradient_metrics(plan, step.index, config)
                )
    return plan


def _gradient_metrics(plan: RankPlan, block: int, config: RomConfig) -> dict[str, dict[str, torch.Tensor]]:
    """What each of a block's factorizations weights its error by, from the plan's measured gradient
    covariances: the Fisher metric's root ``R`` (``{"root": R}``), or the covariance ``G`` itself
    that the scored metric ranks directions by (``{"gradient": G}``); none for the feature metric."""
    if not plan.fisher:
        return {}
    covariances = load_covariances(plan.fisher, block)
    if config.metric == "scored":
        return {name: {"gradient": covariance} for name, covariance in covariances.items()}
    roots = {name: fisher_root(covariance, config.fisher_damping) for name, covariance in covariances.items()}
    return {name: {"root": root} for name, root in roots.items() if root is not None}


def _compress_block(
    model: nn.Module,
    step: BlockStep,
    ranks: dict[str, int],
    config: RomConfig,
    metrics: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Factorize one block's linears. A function of its own so that the dense weights and the
    statistics are freed when it returns, before the walker runs the compressed block."""
    linears = {name: model.get_submodule(name) for name in ranks}
    targets, local = None, config.refine_target == "local"
    if config.refine_epochs:  # the dense block on the inputs it will see, or the dense model's stream
        targets = torch.empty_like(step.inputs) if local else step.reference_outputs
    # the statistics' forward runs on to the block's end when its outputs are the targets
    outputs = targets if targets is not None and local else None
    stats = collect_block_statistics(
        step,
        linears,
        paired=config.target == "dense",
        outputs=outputs,
        dtype=factorization_dtype(config.factorization_precision),
    )
    for name, rank in ranks.items():  # popped: each dense weight and group's statistics go once used
        factorized = rom_factorize(
            linears.pop(name), stats.pop(name), rank, config.center, **metrics.get(name, {})
        )
        set_module(model, name, factorized)
    if targets is not None:
        refine_block(
            step,
            targets,
            config.refine_epochs,
            lr=config.refine_lr,
            seed=config.seed,
            schedule=config.refine_schedule,
            trained=config.refine_params,
            precision=config.training_precision,
        )


def check_calibration_size(config: RomConfig, plan: RankPlan, data: CalibrationSet) -> None:
    """A covariance of N tokens has rank < N: a larger rank would keep arbitrary directions."""
    tokens = data.input_ids.numel()
    largest = max(plan.ranks.values(), default=0)
    if largest >= tokens:
        raise ValueError(
            f"the calibration set has {tokens} tokens but the plan needs rank {largest}: the feature covariance "
            f"of {tokens} tokens cannot support it. Use num_samples x seq_len of at least {4 * largest} "
            "(CLI: --num-samples, --seq-len)"
        )


def rom_factorize(
    linear: nn.Linear,
    stats: LinearStatistics,
    rank: int,
    center: bool = True,
    ridge: float = 1e-3,
    root: torch.Tensor | None = None,
    gradient: torch.Tensor | None = None,
) -> FactorizedLinear:
    """Replace one linear by its rank-``rank`` ROM factorization.

    With a metric ``root`` ``R`` (lower triangular, see linalg.fisher_root) the output error is
    minimized in the metric ``R R^T`` instead of the plain one. With the output's loss-gradient
    covariance ``gradient``, the kept principal directions are ranked by the loss they carry
    (see ``LinearStatistics.principal_output_basis``). With paired statistics
    (error-correcting targets) the factorization instead fits the dense model's outputs ``W z + b``
    from the compressed model's inputs ``x`` (see corrected_factors).
    """
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach().double()
    if stats.site == "paired":
        down, up, bias = corrected_factors(weight.double(), bias, stats.moments, rank, ridge)
    else:
        basis = stats.principal_output_basis(weight, rank, center, root, gradient)
        weight = weight.to(basis.dtype)  # the factors' arithmetic (see LinearStatistics); the bias float64
        # the projection is up @ reads^T: V V^T, or R^-T V V^T R^T in the metric
        if root is None:
            reads = up = basis
        else:
            root = root.to(basis.dtype)
            reads, up = root @ basis, torch.linalg.solve_triangular(root.T, basis, upper=True)
        down = reads.T @ weight
        if center:
            mean = stats.output_mean(weight)
            correction = mean - up.double() @ (reads.T.double() @ mean)
            bias = correction if bias is None else bias + correction
    dtype = linear.weight.dtype
    return FactorizedLinear.from_factors(
        down.to(dtype), up.to(dtype), None if bias is None else bias.to(dtype)
    )


def corrected_factors(
    weight: torch.Tensor, bias: torch.Tensor | None, moments: CrossMoments, rank: int, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors that best predict the dense outputs ``W z + b`` from the inputs ``x``.

    Reduced-rank regression: the least-squares map ``W* = W C_zx C_xx^-1`` restricted to the
    top principal directions ``U`` of its fitted outputs, i.e. of ``F = W C_zx L^-T`` with
    ``C_xx = L L^T`` (a small ridge keeps rarely-excited input directions from blowing up).
    When ``x = z`` (no error upstream) this is exactly the plain ROM factorization.
    """
    covariance = moments.covariance()
    scale = ridge * covariance.diagonal().mean()
    lower = torch.linalg.cholesky(covariance + scale * torch.eye(len(covariance), dtype=covariance.dtype))
    whitened_cross = torch.linalg.solve_triangular(
        lower, moments.cross_covariance(), upper=False
    )  # L^-1 C_xz
    fitted = weight @ whitened_cross.T  # W C_zx L^-T
    up = top_left_singular_vectors(fitted, rank)
    down = torch.linalg.solve_triangular(lower, up.T @ fitted, upper=False, left=False)  # U^T W*
    target_mean = weight @ moments.paired_mean + (0 if bias is None else bias)
    return down, up, target_mean - up @ (down @ moments.mean)


class RomPass(CompressionPass):
    """ROM: calibration windows in, factorized linears out; streams with every allocation (adaptive
    allocation measures its gradients block by block too)."""

    config_class = RomConfig

    def can_stream(self, config: RomConfig) -> bool:
        return True

    def measures(self, config: RomConfig) -> bool:
        return config.allocation == "adaptive"

    def plan(
        self,
        model: nn.Module,
        config: RomConfig,
        data: CalibrationSet,
        progress: bool = True,
        *,
        weights: WeightSource | None = None,
        scratch: Path | None = None,
    ) -> RankPlan:
        return plan_rom(model, config, data, progress, weights, scratch)

    def check(self, config: RomConfig, plan: RankPlan, data: CalibrationSet) -> None:
        check_calibration_size(config, plan, data)

    def apply(self, model, config, data, plan, *, progress=True, stream=None, work_dir=None) -> None:
        run_rom(model, config, data, plan, progress, stream)
