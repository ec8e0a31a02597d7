import pytest
import torch
from torch import nn

from optimum_rom import FactorizedLinear
from optimum_rom.layers import factorized_parameter_count


def full_rank_factorization(linear: nn.Linear) -> FactorizedLinear:
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    return FactorizedLinear.from_factors(s[:, None] * vh, u, linear.bias.detach())


def test_full_rank_factorization_computes_the_same_function():
    torch.manual_seed(0)
    dense = nn.Linear(48, 32)
    layer = full_rank_factorization(dense)
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    assert (layer.in_features, layer.rank, layer.out_features) == (48, 32, 32)


def test_shapes_repr_and_parameter_count():
    layer = FactorizedLinear(576, 1536, rank=205)
    assert layer.down.weight.shape == (205, 576)
    assert layer.up.weight.shape == (1536, 205)
    assert "in_features=576, rank=205, out_features=1536" in repr(layer)
    assert sum(p.numel() for p in layer.parameters()) == factorized_parameter_count(576, 1536, 205)


def test_dtype_moves_and_dense_equivalent():
    torch.manual_seed(0)
    layer = FactorizedLinear(16, 8, rank=4).to(torch.float64)
    assert layer.down.weight.dtype == torch.float64 and layer.up.bias.dtype == torch.float64
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))
    assert layer.half().up.weight.dtype == torch.float16


def test_bad_factors_are_rejected():
    with pytest.raises(ValueError, match="do not chain"):
        FactorizedLinear.from_factors(torch.zeros(4, 16), torch.zeros(8, 5))
    with pytest.raises(ValueError, match="rank >= 1"):
        FactorizedLinear(16, 8, rank=0)
