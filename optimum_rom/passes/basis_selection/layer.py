"""The training-time layer of Basis Selection: a linear written as a weighted sum of its SVD bases.

``W = sum_i c_i u_i v_i^T`` with the bases ``u_i`` (columns of ``left``) and ``v_i^T`` (rows of
``right``) frozen and the coefficients trainable through ``c_i = w_i^2`` (non-negative, and a
basis whose coefficient shrinks gets ever smaller gradients, the paper's parameterization).
Pruning removes bases physically, so each round trains faster than the one before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...calibration import LinearStatistics
from ...layers import FactorizedLinear


class BasisLinear(nn.Module):
    """``y = left @ diag(coefficient_root^2) @ right @ x + bias`` over the bases kept so far."""

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        coefficient_root: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("left", left)  # (out, n): u_i
        self.register_buffer("right", right)  # (n, in): v_i^T
        # Index of each basis in the original SVD (-1 for merged new bases): what a resumed run restores.
        self.register_buffer("basis_ids", torch.arange(left.shape[1], device=left.device), persistent=False)
        self.coefficient_root = nn.Parameter(coefficient_root)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BasisLinear:
        """All SVD bases of ``linear``, with ``c_i`` = the singular values: the same function to start with."""
        weight = linear.weight.detach()
        left, singular_values, right = torch.linalg.svd(weight.double(), full_matrices=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(
            left.to(weight.dtype), right.to(weight.dtype), singular_values.sqrt().to(weight.dtype), bias
        )

    @classmethod
    def from_output_basis(cls, linear: nn.Linear, stats: LinearStatistics) -> BasisLinear:
        """Bases ordered by how much of ``W x`` they carry on the target data (activation-aware).

        ``u_i`` are the eigenvectors of the second moment of ``W x`` (ROM's bases, complete),
        ``c_i = sigma_i`` the root of their eigenvalue and ``v_i^T = u_i^T W / sigma_i``. This is
        the SVD of ``W`` in the data's metric (SVD-LLM's whitened SVD): still exactly ``W``, but
        keeping the largest ``c_i`` is now the best truncation on the data, not on the weights.
        """
        weight = linear.weight.detach().double()
        left = stats.principal_output_basis(weight, min(weight.shape), center=False)
        rows = left.T @ weight
        if stats.site == "input":
            energy = ((rows @ stats.second_moment(center=False)) * rows).sum(1)
        else:
            energy = ((left.T @ stats.second_moment(center=False)) * left.T).sum(1)
        sigma = energy.clamp(min=0).sqrt()
        sigma = sigma.clamp(min=float(sigma.max()) * 1e-6)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        dtype = linear.weight.dtype
        return cls(left.to(dtype), (rows / sigma[:, None]).to(dtype), sigma.sqrt().to(dtype), bias)

    @property
    def in_features(self) -> int:
        return self.right.shape[1]

    @property
    def out_features(self) -> int:
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def coefficients(self) -> torch.Tensor:
        return self.coefficient_root.square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.right) * self.coefficients, self.left, self.bias)

    def prune_to(self, keep: int) -> None:
        """Keep the ``keep`` bases with the largest coefficients (in their original order)."""
        if keep >= self.rank:
            return
        positions = torch.topk(self.coefficients.detach(), keep).indices.sort().values
        self.select(positions)

    def select(self, positions: torch.Tensor) -> None:
        """Keep only the bases at ``positions`` (the coefficient becomes a new parameter)."""
        self.left = self.left[:, positions].contiguous()
        self.right = self.right[positions].contiguous()
        self.basis_ids = self.basis_ids[positions]
        self.coefficient_root = nn.Parameter(
            self.coefficient_root.detach()[positions].clone(),
            requires_grad=self.coefficient_root.requires_grad,
        )

    def append_rank(self, down_rows: torch.Tensor, up_columns: torch.Tensor) -> None:
        """Absorb ``up_columns @ down_rows`` (a merged LoRA adapter: the new bases) as bases with ``c = 1``."""
        added = down_rows.shape[0]
        self.left = torch.cat([self.left, up_columns.to(self.left.dtype)], dim=1)
        self.right = torch.cat([self.right, down_rows.to(self.right.dtype)], dim=0)
        self.basis_ids = torch.cat([self.basis_ids, self.basis_ids.new_full((added,), -1)])
        root = torch.cat([self.coefficient_root.detach(), self.coefficient_root.new_ones(added)])
        self.coefficient_root = nn.Parameter(root, requires_grad=self.coefficient_root.requires_grad)

    def drop_last_rank(self, count: int) -> None:
        """Undo :meth:`append_rank`."""
        self.select(torch.arange(self.rank - count, device=self.left.device))

    def to_factorized(self) -> FactorizedLinear:
        """The same function as a :class:`FactorizedLinear` of the same rank, re-factorized by SVD.

        ``up`` gets orthonormal columns and ``down`` the singular values, ordered by importance,
        as in the layers the ROM pass produces.
        """
        up = self.left.double()
        down = self.coefficients.detach().double()[:, None] * self.right.double()
        up_basis, up_core = torch.linalg.qr(up)
        down_basis, down_core = torch.linalg.qr(down.T)
        core_left, singular_values, core_right = torch.linalg.svd(up_core @ down_core.T)
        new_up = up_basis @ core_left
        new_down = singular_values[:, None] * (core_right @ down_basis.T)
        dtype = self.left.dtype
        bias = None if self.bias is None else self.bias.detach()
        return FactorizedLinear.from_factors(new_down.to(dtype), new_up.to(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, bases={self.rank}, out_features={self.out_features}"
