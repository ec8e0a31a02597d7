import pytest
import torch

from optimum_rom.calibration import Moments, collect_block_statistics, walk_blocks

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
