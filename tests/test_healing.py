import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_rom import FactorizedLinear, LowRankOptimizer, RomConfig, healing, preflight
from optimum_rom.calibration.data import CalibrationSet
from optimum_rom.configs import HealingSpec
from optimum_rom.healing import DistillationLoss, WindowLoss, heal, lora_targets
from optimum_rom.optimizer import HEAL_SEQ_LEN
from optimum_rom.training import adam

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
    names = lora_targets(model, "blocks")
    assert "model.layers.0.self_attn.q_proj.down" in names and "model.layers.0.self_attn.q_proj" not in names
    parameters = model.num_parameters()
    before = model.model.layers[0].mlp.up_proj.down.weight.detach().clone()

    ids = torch.randint(0, 500, (32, 24))
    report = heal(model, WindowLoss(CalibrationSet(ids)), HealingSpec(steps=3), progress=False)

    assert report.steps == 3 and report.tokens == 3 * 4 * 24
    assert model.num_parameters() == parameters
    assert isinstance(model.model.layers[0].mlp.up_proj, FactorizedLinear)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.down.weight, before)


def test_full_healing_trains_every_block_parameter_but_not_the_embeddings(tokenizer, calibration_file):
    model, _ = compressed_tiny_model(tokenizer, calibration_file)
    parameters = model.num_parameters()
    block = model.model.layers[0]
    watched = {
        "factor": block.mlp.up_proj.down.weight,
        "norm": block.input_layernorm.weight,
        "embedding": model.model.embed_tokens.weight,
    }
    before = {name: tensor.detach().clone() for name, tensor in watched.items()}

    ids = torch.randint(0, 500, (32, 24))
    report = heal(
        model, WindowLoss(CalibrationSet(ids)), HealingSpec(steps=3, trained="full"), progress=False
    )

    assert report.steps == 3
    moved = {name: not torch.equal(watched[name], before[name]) for name in watched}
    assert moved == {"factor": True, "norm": True, "embedding": False}
    assert model.num_parameters() == parameters and isinstance(block.mlp.up_proj, FactorizedLinear)
    assert all(p.requires_grad for p in model.parameters())  # handed back like a freshly loaded model


@pytest.mark.parametrize(
    ("precision", "trained"), [("float32", "lora"), ("bfloat16", "lora"), ("float32", "full")]
)
def test_distillation_moves_the_student_towards_the_teacher(precision, trained, tokenizer, calibration_file):
    student, teacher = compressed_tiny_model(tokenizer, calibration_file)
    ids = torch.randint(0, 500, (16, 24))

    def divergence():
        with torch.no_grad():
            s = torch.log_softmax(student(ids).logits, -1)
            t = torch.log_softmax(teacher(ids).logits, -1)
            return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()

    before = divergence()
    spec = HealingSpec(steps=20, learning_rate=1e-3, precision=precision, trained=trained)
    heal(student, WindowLoss(CalibrationSet(ids), teacher), spec, progress=False)
    assert divergence() < before


def test_the_distillation_loss_is_torchs_kl_divergence_in_value_and_gradient():
    student, teacher = torch.randn(2, 37, 300, dtype=torch.float64).mul(4).unbind()
    ours = student.clone().requires_grad_(True)  # 37 rows: the last chunk is a partial one
    loss = DistillationLoss.apply(ours, teacher)
    (loss * 3).backward()
    reference = student.clone().requires_grad_(True)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(reference, -1),
        torch.log_softmax(teacher, -1),
        log_target=True,
        reduction="batchmean",
    )
    (expected * 3).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-7)


class StepRates(WindowLoss):
    """Window batches that note the learning rate each step runs at, read off the optimizer
    healing builds (recorded in ``optimizers``)."""

    def __init__(self, data: CalibrationSet, optimizers: list[torch.optim.Optimizer]) -> None:
        super().__init__(data)
        self.optimizers = optimizers
        self.rates: list[float] = []

    def __call__(self, model, step: int) -> torch.Tensor:
        self.rates.append(self.optimizers[-1].param_groups[0]["lr"])
        return super().__call__(model, step)


# a wall-clock budget ends within a step of its time: on a busy machine a step is a larger share of it
@pytest.mark.parametrize(("budget", "rest"), [({"steps": 20}, 0.1), ({"minutes": 0.1}, 0.5)])
def test_cosine_healing_warms_up_and_comes_to_rest_when_its_budget_ends(
    budget, rest, tokenizer, calibration_file, monkeypatch
):
    built: list[torch.optim.Optimizer] = []
    monkeypatch.setattr(
        healing, "adam", lambda *args, **kwargs: built.append(adam(*args, **kwargs)) or built[-1]
    )
    model, _ = compressed_tiny_model(tokenizer, calibration_file)
    data = CalibrationSet(torch.randint(0, 500, (32, 24)))
    cosine, constant = StepRates(data, built), StepRates(data, built)
    heal(model, cosine, HealingSpec(**budget, schedule="cosine", learning_rate=1e-3), progress=False)
    heal(model, constant, HealingSpec(steps=20, learning_rate=1e-3), progress=False)

    largest = max(cosine.rates)
    assert cosine.rates[0] == 0  # the warm-up starts from zero
    assert largest == pytest.approx(1e-3, rel=0.1)  # the full rate between
    assert cosine.rates[-1] < rest * largest  # and next to nothing at the end
    assert constant.rates == [1e-3] * 20


def test_heal_lr_sets_the_rate_healing_steps_at(model_dir, calibration_file, monkeypatch):
    rates: list[float] = []
    monkeypatch.setattr(healing, "adam", lambda params, lr: rates.append(lr) or adam(params, lr=lr))
    shape = {"params_ratio": 0.7, "num_samples": 16, "seq_len": 32, "heal_minutes": 0.01}
    for options in ({"heal_lr": 1e-3}, {}, {"heal_params": "full"}):
        optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
        optimizer.compress(RomConfig(**shape, **options), calibration=calibration_file, progress=False)
    assert rates == [1e-3, 2e-4, 5e-5]  # what was asked, else the rate measured for what is trained


def test_healing_through_the_optimizer_keeps_the_size(model_dir, calibration_file, tmp_path):
    config = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, heal_minutes=0.05)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    model = optimizer.compress(
        config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False
    )
    assert optimizer.report.healing["steps"] > 0
    assert optimizer.report.ratio == pytest.approx(0.7, rel=0.01)
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(tmp_path / "rom").num_parameters()


def test_a_time_budget_heals_for_what_the_compression_leaves(model_dir, calibration_file, tmp_path):
    budget = 0.3  # minutes, for the whole compress call: the tiny model's compression takes seconds, more on a busy machine
    config = RomConfig.from_preset("best", params_ratio=0.7, num_samples=16, seq_len=32, time_budget=budget)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    optimizer.compress(config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False)
    healing = optimizer.report.healing
    assert healing["steps"] > 0
    assert healing["seconds"] <= 60 * budget - optimizer.report.seconds + 2  # the budget, not on top of it
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "rom").config.quantization_config
    assert (saved.allocation, saved.refine_epochs, saved.time_budget) == ("adaptive", 2, budget)


def test_a_spent_time_budget_saves_the_model_unhealed_and_says_so(model_dir, calibration_file, tmp_path):
    config = RomConfig.from_preset("best", params_ratio=0.7, num_samples=16, seq_len=32, time_budget=1e-4)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    with pytest.warns(UserWarning, match="no time is left to heal"):
        optimizer.compress(config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False)
    assert optimizer.report.healing is None
    assert (tmp_path / "rom" / "config.json").is_file()


def test_healing_without_distillation_learns_the_texts_own_tokens(model_dir, calibration_file):
    config = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, heal_minutes=0.02, heal_distill=False)
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    optimizer.compress(config, calibration=calibration_file, progress=False)
    # next-token cross-entropy of a random 512-token model is ~ln(512) = 6.2 nats; a KL to the dense
    # model it was compressed from would be near 0
    assert optimizer.report.healing["first_loss"] > 3


def test_healing_that_cannot_fit_in_memory_is_refused_before_the_compression(
    model_dir, calibration_file, monkeypatch
):
    """Full fine-tuning adds a gradient and Adam's two moments per block parameter; where only
    LoRA fits, the run stops at once and names the way out."""
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    full = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, heal_minutes=0.02, heal_params="full")
    lora = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32, heal_minutes=0.02)
    model = optimizer.model
    needs = {
        config.heal_params: preflight.healing_memory(
            model, config, config.healing(), HEAL_SEQ_LEN, resident=True
        )
        for config in (full, lora)
    }
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    assert needs["full"] - needs["lora"] == pytest.approx(12 * 0.7 * blocks, rel=0.1)
    available = (needs["full"] + needs["lora"]) // 2
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    # the calibration's own check budgets a chunk of activations far above this tiny model's
    monkeypatch.setattr(preflight, "CHUNK_ACTIVATION_BYTES", 1)

    with pytest.raises(
        MemoryError, match=r"healing needs about .* heal_params='lora' \(CLI --heal-params lora\)"
    ):
        optimizer.compress(full, calibration=calibration_file, progress=False)
    assert optimizer.report is None  # refused before any work
    optimizer.compress(lora, calibration=calibration_file, progress=False)
    assert optimizer.report.healing["steps"] > 0


def test_heal_minutes_must_be_positive():
    with pytest.raises(ValueError, match="heal_minutes must be a non-negative"):
        RomConfig(heal_minutes=-1)
    with pytest.raises(ValueError, match="time_budget must be a non-negative"):
        RomConfig(time_budget=-1)
    with pytest.raises(ValueError, match="both set: choose one"):
        RomConfig.from_preset("best", heal_minutes=15)
    with pytest.raises(ValueError, match="heal_lr must be a positive number"):
        RomConfig(heal_lr=0)
    with pytest.raises(ValueError, match="heal_params must be one of"):
        RomConfig(heal_params="adapters")
