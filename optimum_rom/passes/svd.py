"""The plain-SVD pass: replace each weight by its truncated SVD (the data-free baseline).

``W = U S V^T`` is cut to its top ``r`` singular directions and written in the same shape as
ROM's factors, ``up = U_r`` (orthonormal) and ``down = U_r^T W = S_r V_r^T``; the dense bias
stays on ``up``. Compared with ROM this is the projection onto the principal subspace of the
*weight* instead of that of the layer's *outputs on real data*.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import RankPlan, model_ratio, plan_model
from ..configs.svd import SvdConfig
from ..layers import FactorizedLinear
from ..structure import set_module
from .base import CompressionPass, PassData


def plan_svd(model: nn.Module, config: SvdConfig, data: None = None, progress: bool = True) -> RankPlan:
    return plan_model(
        model,
        model_ratio(config, model),
        False,
        config.allocation,
        config.target_modules,
        config.num_trailing_blocks,
    )


def run_svd(
    model: nn.Module,
    config: SvdConfig,
    input_ids: torch.Tensor | None = None,
    plan: RankPlan | None = None,
    progress: bool = True,
) -> RankPlan:
    """Compress ``model`` in place; ``input_ids`` is ignored (SVD needs no calibration data)."""
    plan = plan or plan_svd(model, config)
    with torch.no_grad():
        for name, rank in tqdm(plan.ranks.items(), desc="SVD", unit="linear", disable=not progress):
            set_module(model, name, svd_factorize(model.get_submodule(name), rank))
    return plan


def svd_factorize(linear: nn.Linear, rank: int) -> FactorizedLinear:
    """The rank-``rank`` truncated SVD of ``linear`` as a FactorizedLinear."""
    weight = linear.weight.detach().double()
    basis = torch.linalg.svd(weight, full_matrices=False)[0][:, :rank]
    dtype = linear.weight.dtype
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    return FactorizedLinear.from_factors((basis.T @ weight).to(dtype), basis.to(dtype), bias)


class SvdPass(CompressionPass):
    """The data-free baseline."""

    config_class = SvdConfig
    data = PassData.NONE

    def plan(
        self, model: nn.Module, config: SvdConfig, data: None = None, progress: bool = True, **_
    ) -> RankPlan:
        return plan_svd(model, config)

    def apply(self, model, config, data, plan, *, progress=True, stream=None, work_dir=None) -> None:
        run_svd(model, config, plan=plan, progress=progress)
