"""The factorized linear layer every pass produces: ``y = up(down(x))``.

Two plain ``nn.Linear`` children keep the layer transparent to the rest of the ecosystem:
PEFT can adapt them, ONNX export sees two thin MatMuls, and the state dict is just
``<name>.down.weight``, ``<name>.up.weight`` and ``<name>.up.bias``.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear(in_features, out_features)`` with a rank-``rank`` weight.

    ``down`` (rank x in_features) projects into the kept subspace, ``up`` (out_features x rank)
    maps back and carries the bias (the dense bias plus any mean correction of the pass).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"FactorizedLinear needs rank >= 1, got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None
    ) -> FactorizedLinear:
        """Build a layer from ``down`` (r x in) and ``up`` (out x r) weights and an optional bias."""
        rank, in_features = down.shape
        out_features, up_rank = up.shape
        if up_rank != rank:
            raise ValueError(f"factor shapes do not chain: down {tuple(down.shape)}, up {tuple(up.shape)}")
        layer = cls(
            in_features, out_features, rank, bias=bias is not None, device=down.device, dtype=down.dtype
        )
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def append_rank(self, down_rows: torch.Tensor, up_columns: torch.Tensor) -> None:
        """Grow the rank exactly: ``down = [down; down_rows]``, ``up = [up, up_columns]`` (a merged LoRA adapter)."""
        down = torch.cat([self.down.weight.data, down_rows.to(self.down.weight.dtype)], dim=0)
        up = torch.cat([self.up.weight.data, up_columns.to(self.up.weight.dtype)], dim=1)
        self._set_factors(down, up)

    def drop_last_rank(self, count: int) -> None:
        """Undo :meth:`append_rank`: remove the last ``count`` rank components."""
        keep = self.rank - count
        self._set_factors(self.down.weight.data[:keep].clone(), self.up.weight.data[:, :keep].clone())

    def _set_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down.weight = nn.Parameter(down, requires_grad=self.down.weight.requires_grad)
        self.up.weight = nn.Parameter(up, requires_grad=self.up.weight.requires_grad)
        self.down.out_features = self.up.in_features = down.shape[0]

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``up @ down`` (out x in), e.g. to de-factorize."""
        return self.up.weight @ self.down.weight

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing exactly the same function (larger, for debugging or export)."""
        weight = self.dense_weight()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.up.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.up.bias is not None:
                linear.bias.copy_(self.up.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"


def factorized_parameter_count(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
    """Parameters of a rank-``rank`` FactorizedLinear (the up bias included when present)."""
    return rank * (in_features + out_features) + (out_features if bias else 0)
