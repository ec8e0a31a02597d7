import copy

import pytest
import torch

from optimum_rom import FactorizedLinear, LowRankOptimizer, RomConfig
from optimum_rom.calibration.data import CalibrationSet
from optimum_rom.healing import block_linear_names, heal

from .conftest import tiny_model


def compressed_tiny_model(tokenizer, calibration_file):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    config = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32)
    return LowRankOptimizer(model, tokenizer).compress(
        config, calibration=calibration_file, progress=False
    ), dense


def test_lora_goes_on_the_factors_so_sizes_survive_the_merge(tokenizer, calibration_file):
    model, _ = compressed_tiny_model(tokenizer, calibration_file)
    names = block_linear_names(model)
    assert "model.layers.0.self_attn.q_proj.down" in names and "model.layers.0.self_attn.q_proj" not in names
    parameters = model.num_parameters()
    before = model.model.layers[0].mlp.up_proj.down.weight.detach().clone()

    ids = torch.randint(0, 500, (32, 24))
    report = heal(model, CalibrationSet(ids), minutes=0.05, progress=False)

    assert report.steps > 0 and report.tokens == report.steps * 4 * 24
    assert model.num_parameters() == parameters
    assert isinstance(model.model.layers[0].mlp.up_proj, FactorizedLinear)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.down.weight, before)


def test_distillation_moves_the_student_towards_the_teacher(tokenizer, calibration_file):
    student, teacher = compressed_tiny_model(tokenizer, calibration_file)
    ids = torch.randint(0, 500, (16, 24))

    def divergence():
        with torch.no_grad():
            s = torch.log_softmax(student(ids).logits, -1)
            t = torch.log_softmax(teacher(ids).logits, -1)
            return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()

    before = divergence()
    heal(student, CalibrationSet(ids), minutes=0.1, teacher=teacher, lr=1e-3, progress=False)
    assert divergence() < before


def test_healing_through_the_optimizer_keeps_the_size(model_dir, calibration_file, tmp_path):
    config = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, heal_minutes=0.05)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    model = optimizer.compress(
        config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False
    )
    assert optimizer.report.healing["steps"] > 0
    assert optimizer.report.ratio == pytest.approx(0.7, rel=0.01)
    assert model.num_parameters() == optimizer.report.params_after


def test_heal_minutes_must_be_positive():
    with pytest.raises(ValueError, match="heal_minutes must be a non-negative"):
        RomConfig(heal_minutes=-1)
