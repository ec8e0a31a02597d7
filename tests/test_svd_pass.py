"""The plain-SVD baseline pass: data-free, same allocation and checkpoint format as ROM."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_rom import FactorizedLinear, LowRankOptimizer, RomConfig, SvdConfig
from optimum_rom.passes.rom import plan_rom
from optimum_rom.passes.svd import plan_svd, svd_factorize
from optimum_rom.structure import count_parameters

from .conftest import ARCHITECTURES, tiny_model


def test_svd_layer_is_the_best_rank_r_approximation_of_the_weight():
    torch.manual_seed(0)
    linear, rank = nn.Linear(48, 40), 8
    layer = svd_factorize(linear, rank)
    singular_values = torch.linalg.svdvals(linear.weight.detach().double())
    error = torch.linalg.matrix_norm(layer.dense_weight().double() - linear.weight.double())
    assert error.item() == pytest.approx(singular_values[rank:].square().sum().sqrt().item(), rel=1e-4)
    torch.testing.assert_close(layer.up.bias, linear.bias)
    torch.testing.assert_close(layer.up.weight.T @ layer.up.weight, torch.eye(rank), atol=1e-5, rtol=0)


def test_full_rank_svd_is_exact():
    torch.manual_seed(0)
    linear, x = nn.Linear(32, 24, bias=False), torch.randn(5, 32)
    layer = svd_factorize(linear, 24)
    assert layer.up.bias is None
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_svd_compresses_without_calibration_to_the_target(arch, tokenizer):
    model = tiny_model(arch)
    ids = torch.randint(0, 500, (2, 16))
    dense_logits = model(ids).logits
    optimizer = LowRankOptimizer(model, tokenizer)
    compressed = optimizer.compress(SvdConfig(params_ratio=0.8), progress=False)
    assert optimizer.report.method == "svd" and optimizer.report.ratio == pytest.approx(0.8, rel=0.01)
    assert compressed.config.quantization_config.calibration is None
    logits = compressed(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)


def test_svd_and_rom_share_the_allocation():
    model = tiny_model("llama")
    for allocation in ("uniform", "paper"):
        svd = plan_svd(model, SvdConfig(params_ratio=0.85, allocation=allocation))
        rom = plan_rom(model, RomConfig(params_ratio=0.85, allocation=allocation, center=False))
        assert svd.ranks == rom.ranks and svd.ranks


def test_svd_checkpoint_saves_and_reloads_with_automodel(model_dir, tmp_path):
    optimizer = LowRankOptimizer.from_pretrained(model_dir("qwen2"))
    compressed = optimizer.compress(SvdConfig(params_ratio=0.8), save_dir=tmp_path / "svd", progress=False)
    config = json.loads((tmp_path / "svd" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "svd" and config["modules"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "svd")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, FactorizedLinear)
    assert count_parameters(reloaded) == count_parameters(compressed)
    ids = torch.randint(0, 500, (1, 12))
    torch.testing.assert_close(reloaded(ids).logits, compressed(ids).logits, rtol=0, atol=0)


def test_bad_svd_config():
    with pytest.raises(ValueError, match="allocation must be one of"):
        SvdConfig(allocation="random")
    with pytest.raises(ValueError, match="out of reach"):
        LowRankOptimizer(tiny_model("llama")).compress(SvdConfig(params_ratio=0.01), progress=False)
