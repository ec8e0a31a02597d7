import pytest
import torch

from optimum_rom.calibration import Moments
from optimum_rom.calibration.statistics import CrossMoments


def wide_features(n=3000, dim=600, seed=0):
    """Wider than the Gram matrix's column bands, with a large mean like LLM hidden states."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5
    return torch.randn(n, dim, generator=generator) @ mixing + 5 * torch.rand(dim, generator=generator)


def reference_covariance(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    centred = x - x.mean(0)
    return centred.T @ centred / len(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_streamed_in_chunks_match_the_float64_covariance(dtype):
    x = wide_features().to(dtype)
    moments = Moments(x.shape[1])
    for chunk in x.split(700):
        moments.update(chunk)
    expected = reference_covariance(x)
    torch.testing.assert_close(
        moments.covariance(), expected, rtol=0, atol=1e-5 * expected.abs().max().item()
    )
    torch.testing.assert_close(moments.mean, x.double().mean(0), rtol=0, atol=1e-5)


def test_statistics_taken_inside_a_bfloat16_forward_keep_float32_products():
    """The walk's hooks run under the block's autocast; its bfloat16 rounding must not reach the sums."""
    x = wide_features().bfloat16()  # what a bfloat16 walk hands over: exactly representable
    inside = CrossMoments(x.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk, paired in zip(x.split(700), (2 * x).split(700), strict=True):
            inside.update_pair(chunk, paired)
    expected = reference_covariance(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(inside.covariance(), expected, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(inside.cross_covariance(), 2 * expected, rtol=0, atol=2e-5 * scale)
