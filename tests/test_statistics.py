import pytest
import torch

from optimum_rom.calibration import Moments, collect_block_statistics, walk_blocks
from optimum_rom.calibration.statistics import LinearStatistics

from .conftest import tiny_model


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


@pytest.mark.parametrize("paired", [False, True])
def test_statistics_of_a_bfloat16_walk_keep_float32_products(paired):
    """The statistics' hooks run inside the block's autocast; its bfloat16 rounding must not reach
    the sums: each group's covariance is the float64 one of the features its hook was handed."""
    model = tiny_model("llama")
    ids = torch.randint(0, 500, (16, 32), generator=torch.Generator().manual_seed(0))
    step = next(iter(walk_blocks(model, ids, progress=False, precision="bfloat16", reference=paired)))
    linears = {name: step.block.get_submodule(name) for name in ("self_attn.q_proj", "mlp.down_proj")}
    seen = {name: [] for name in linears}  # q_proj is measured on its input, down_proj on its output
    handles = [
        linears["self_attn.q_proj"].register_forward_pre_hook(
            lambda m, i: seen["self_attn.q_proj"].append(i[0])
        ),
        linears["mlp.down_proj"].register_forward_hook(lambda m, i, o: seen["mlp.down_proj"].append(o)),
    ]
    stats = collect_block_statistics(step, linears, paired=paired)
    for handle in handles:
        handle.remove()
    for name, features in seen.items():
        if paired and name == "mlp.down_proj":
            continue  # paired statistics are of inputs only
        measured = features[1:]  # the first is the one-sequence probe that finds the shared inputs
        expected = reference_covariance(torch.cat([f.reshape(-1, f.shape[-1]) for f in measured]))
        scale = expected.abs().max().item()
        moments = stats[name].moments
        torch.testing.assert_close(moments.covariance(), expected, rtol=0, atol=1e-5 * scale)
        if paired:  # the dense model's stream is the same one here: the cross-covariance is the covariance
            torch.testing.assert_close(moments.cross_covariance(), expected, rtol=0, atol=1e-5 * scale)


def decaying_features(n=4000, dim=300, seed=0):
    """Variances spanning six decades, and three channels with a huge mean, as LLM hidden states have."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    x = (torch.randn(n, dim, generator=generator, dtype=torch.float64) * scales) @ basis.T
    x[:, :3] += 200.0
    return x.float()


@pytest.mark.parametrize("site", ["input", "output"])
@pytest.mark.parametrize("out_features", [120, 900])  # F = W L wide (q/k/v-like) and tall (gate/up-like)
@pytest.mark.parametrize("center", [True, False])
def test_float32_factorizations_truncate_as_well_as_float64(site, out_features, center):
    """A basis computed in float32 from the float64 sums leaves the truncation error the float64
    basis leaves, and the spectrum's tails (what the damage curves sum) agree."""
    x = decaying_features()
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, x.shape[1], generator=generator) / x.shape[1] ** 0.5
    outputs = x.double() @ weight.double().T
    moments = Moments(x.shape[1] if site == "input" else out_features)
    for chunk in (x if site == "input" else outputs.float()).split(1000):
        moments.update(chunk)
    exact, fast = (LinearStatistics(site, moments, dtype) for dtype in (torch.float64, torch.float32))
    measured = outputs - outputs.mean(0) if center else outputs

    def truncation_error(basis: torch.Tensor) -> float:
        basis = basis.double()
        return (measured - measured @ basis @ basis.T).square().sum().item()

    total = truncation_error(torch.zeros(out_features, 0))
    for share in (0.05, 0.5, 0.9):
        rank = int(share * min(out_features, x.shape[1]))
        best = truncation_error(exact.principal_output_basis(weight, rank, center))
        # float32 resolves the spectrum to about its epsilon of the whole
        excess = truncation_error(fast.principal_output_basis(weight, rank, center)) - best
        assert excess <= 1e-3 * best + 1e-7 * total
    exact_tail, fast_tail = (
        spectrum.flip(0).cumsum(0).flip(0)
        for spectrum in (exact.output_spectrum(weight, center), fast.output_spectrum(weight, center))
    )
    torch.testing.assert_close(fast_tail, exact_tail, rtol=1e-3, atol=1e-5 * exact_tail[0].item())
