import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_rom import BasisSelectionConfig, FactorizedLinear, LoraFactorizedLinear, LowRankOptimizer
from optimum_rom.calibration import LinearStatistics, Moments
from optimum_rom.evaluation import answer_loss
from optimum_rom.passes.basis_selection import BasisLinear, run_basis_selection
from optimum_rom.passes.basis_selection.model import kept_bases
from optimum_rom.structure import count_parameters
from optimum_rom.task_data import PromptAnswer, training_examples

from .conftest import tiny_model

FAST = dict(num_rounds=2, steps_per_round=2, batch_size=4, num_samples=64, seq_len=64, calibration_windows=4)


def counting_pairs(count=24):
    """A learnable toy task: continue a count."""
    return [
        PromptAnswer(f"Count from {i}:", " " + " ".join(str(n) for n in range(i, i + 6)))
        for i in range(count)
    ]


def features(n=3000, dim=48, seed=0):
    """Correlated inputs with a large mean, like LLM hidden states."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator)
    return torch.randn(n, dim, generator=generator) @ mixing * 0.3 + 3 * torch.randn(dim, generator=generator)


def input_statistics(x):
    moments = Moments(x.shape[1])
    moments.update(x)
    return LinearStatistics("input", moments)


@pytest.mark.parametrize("out_features", [32, 96])
def test_both_kinds_of_bases_start_as_the_exact_linear(out_features):
    torch.manual_seed(0)
    x, linear = features(), nn.Linear(48, out_features)
    for layer in (
        BasisLinear.from_linear(linear),
        BasisLinear.from_output_basis(linear, input_statistics(x)),
    ):
        assert layer.rank == min(48, out_features)
        torch.testing.assert_close(layer(x), linear(x), atol=1e-4, rtol=1e-4)
        assert (layer.coefficients[:-1] >= layer.coefficients[1:] - 1e-5).all()  # most important first


def test_activation_bases_truncate_better_on_the_data_than_weight_svd():
    torch.manual_seed(0)
    x, linear = features(), nn.Linear(48, 40, bias=False)
    errors = {}
    for kind, layer in [
        ("svd", BasisLinear.from_linear(linear)),
        ("activation", BasisLinear.from_output_basis(linear, input_statistics(x))),
    ]:
        layer.prune_to(8)
        errors[kind] = (layer(x) - linear(x)).pow(2).mean()
    assert errors["activation"] < 0.5 * errors["svd"]


def test_pruning_keeps_the_largest_coefficients_and_refactorizing_is_exact():
    torch.manual_seed(0)
    layer = BasisLinear.from_linear(nn.Linear(24, 16))
    with torch.no_grad():
        layer.coefficient_root.copy_(torch.arange(16.0).flip(0).roll(3))  # scramble the order
    largest = set(torch.topk(layer.coefficients, 5).indices.tolist())
    layer.prune_to(5)
    assert set(layer.basis_ids.tolist()) == largest and layer.rank == 5
    layer.append_rank(torch.randn(2, 24), torch.randn(16, 2))  # new bases, as a merged adapter
    factorized = layer.to_factorized()
    assert isinstance(factorized, FactorizedLinear) and factorized.rank == 7
    x = torch.randn(10, 24)
    torch.testing.assert_close(factorized(x), layer(x), atol=1e-4, rtol=1e-4)


def test_new_bases_are_peft_lora_and_merging_makes_them_bases():
    model = nn.Sequential(BasisLinear.from_linear(nn.Linear(24, 16)))
    model[0].prune_to(6)
    peft_model = get_peft_model(model, LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    adapted = peft_model.base_model.model[0]
    assert isinstance(adapted, LoraFactorizedLinear)
    x = torch.randn(5, 24)
    expected = peft_model(x).detach()
    merged = peft_model.merge_and_unload()
    assert isinstance(merged[0], BasisLinear) and merged[0].rank == 9
    torch.testing.assert_close(merged[0](x), expected, atol=1e-5, rtol=1e-5)


def test_the_pruning_schedule_is_front_loaded_and_ends_at_the_target():
    kept = [kept_bases(576, 200, t, 6) for t in range(1, 7)]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 200
    assert 576 - kept[0] > kept[0] - kept[1] > kept[-2] - kept[-1]  # most bases go first


@pytest.mark.parametrize(
    ("arch", "options", "head_factorized"),
    [("llama", {}, True), ("qwen2", {}, False), ("llama", {"include_lm_head": False}, False)],
)
def test_compressed_model_hits_the_size_saves_and_reloads(
    arch, options, head_factorized, tokenizer, tmp_path
):
    model = tiny_model(arch)
    dense_params = count_parameters(model)
    optimizer = LowRankOptimizer(model, tokenizer)
    config = BasisSelectionConfig(params_ratio=0.7, **FAST, **options)

    compressed = optimizer.compress(
        config, train_dataset=counting_pairs(), save_dir=tmp_path / "bs", progress=False
    )

    assert optimizer.report.ratio == pytest.approx(0.7, rel=0.01)
    assert count_parameters(compressed) <= 0.7 * dense_params
    assert isinstance(compressed.lm_head, FactorizedLinear) == head_factorized  # a tied head stays tied
    assert isinstance(compressed.model.layers[0].mlp.up_proj, FactorizedLinear)
    assert not any(isinstance(m, (BasisLinear, LoraFactorizedLinear)) for m in compressed.modules())
    saved = json.loads((tmp_path / "bs" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "basis_selection" and saved["calibration"] == "24 prompt/answer pairs"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bs")
    ids = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(reloaded(ids).logits, compressed(ids).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob(".bs.work"))  # the resumable state is gone once the model is saved


def test_training_on_the_task_beats_pruning_alone(tokenizer):
    pairs = counting_pairs()
    losses = {}
    for name, learning_rate in [("trained", 2e-2), ("pruned only", 1e-12)]:
        config = BasisSelectionConfig(
            params_ratio=0.7,
            **{**FAST, "num_rounds": 3, "steps_per_round": 4},
            learning_rate=learning_rate,
            new_bases_learning_rate=learning_rate,
        )
        optimizer = LowRankOptimizer(tiny_model("llama"), tokenizer)
        model = optimizer.compress(config, train_dataset=pairs, progress=False)
        losses[name] = answer_loss(model, tokenizer, pairs, progress=False).loss
    assert losses["trained"] < losses["pruned only"] - 0.05


def test_gradient_checkpointing_trains_the_same_model(tokenizer, monkeypatch):
    import transformers.modeling_utils

    checkpoint, checkpointed = transformers.modeling_utils.checkpoint, []
    monkeypatch.setattr(
        transformers.modeling_utils,
        "checkpoint",
        lambda *a, **k: checkpointed.append(1) or checkpoint(*a, **k),
    )
    examples = training_examples(tokenizer, counting_pairs(), FAST["num_samples"], FAST["seq_len"])
    models, calls = [], []
    for enabled in (False, True):
        model = tiny_model("llama")
        config = BasisSelectionConfig(params_ratio=0.7, **FAST, gradient_checkpointing=enabled)
        run_basis_selection(model, config, examples, progress=False)
        models.append(model)
        calls.append(len(checkpointed))
    assert calls[0] == 0 and calls[1] > 0  # the blocks of the training steps were checkpointed
    ids = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(models[1](ids).logits, models[0](ids).logits, atol=1e-4, rtol=1e-4)


def test_an_interrupted_run_resumes_from_its_last_round_and_ends_the_same(tokenizer, tmp_path, monkeypatch):
    import optimum_rom.passes.basis_selection.run as run_module

    config = BasisSelectionConfig(params_ratio=0.7, **{**FAST, "num_rounds": 3})
    examples = training_examples(tokenizer, counting_pairs(), config.num_samples, config.seq_len)
    uninterrupted = tiny_model("llama")
    run_basis_selection(uninterrupted, config, examples, progress=False)

    original, rounds = run_module.train_steps, []

    def crash_in_round_three(*args, **kwargs):
        rounds.append(kwargs["first_step"] // config.steps_per_round + 1)
        if rounds[-1] == 3 and len(rounds) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_steps", crash_in_round_three)
    with pytest.raises(KeyboardInterrupt):
        run_basis_selection(tiny_model("llama"), config, examples, progress=False, work_dir=tmp_path)
    resumed = tiny_model("llama")
    run_basis_selection(resumed, config, examples, progress=False, work_dir=tmp_path)

    assert rounds == [1, 2, 3, 3]  # the rerun trained round 3 only
    ids = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(resumed(ids).logits, uninterrupted(ids).logits, atol=1e-5, rtol=1e-5)


def test_state_of_a_different_run_is_ignored(tokenizer, tmp_path, caplog, monkeypatch):
    import optimum_rom.passes.basis_selection.run as run_module

    examples = training_examples(tokenizer, counting_pairs(), FAST["num_samples"], FAST["seq_len"])
    first = BasisSelectionConfig(params_ratio=0.7, **FAST)
    run_basis_selection(tiny_model("llama"), first, examples, progress=False, work_dir=tmp_path)
    assert json.loads((tmp_path / "progress.json").read_text())["completed"] == first.num_rounds

    trained_rounds = []
    original = run_module.train_steps
    monkeypatch.setattr(
        run_module, "train_steps", lambda *a, **k: trained_rounds.append(k["first_step"]) or original(*a, **k)
    )
    changed = BasisSelectionConfig(params_ratio=0.7, **FAST, learning_rate=1e-2)
    run_basis_selection(tiny_model("llama"), changed, examples, progress=False, work_dir=tmp_path)

    assert "belongs to a different model, config or data set" in caplog.text
    assert len(trained_rounds) == changed.num_rounds  # started over instead of resuming


def test_fine_tune_stage_keeps_the_size(tokenizer):
    results = {}
    for steps in (0, 4):
        optimizer = LowRankOptimizer(tiny_model("qwen2"), tokenizer)
        config = BasisSelectionConfig(
            params_ratio=0.7, **FAST, fine_tune_steps=steps, fine_tune_learning_rate=1e-2
        )
        model = optimizer.compress(config, train_dataset=counting_pairs(), progress=False)
        results[steps] = (
            count_parameters(model),
            model.model.layers[0].mlp.up_proj.up.weight.detach().clone(),
        )
    assert results[0][0] == results[4][0]
    assert not torch.allclose(results[0][1], results[4][1])


def test_bad_input_fails_before_any_work(tokenizer, tmp_path):
    optimizer = LowRankOptimizer(tiny_model("llama"), tokenizer)
    pairs = counting_pairs()
    cases = [
        (dict(calibration=["some text"]), ValueError, "trains on the target application's data"),
        (dict(train_dataset=pairs, calibration=["x"]), ValueError, "not calibration="),
        (dict(train_dataset=tmp_path / "missing.jsonl"), FileNotFoundError, "task data not found"),
        (dict(train_dataset=["a string"]), TypeError, "list of PromptAnswer"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            optimizer.compress(BasisSelectionConfig(**FAST), save_dir=tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match="out of reach"):
        optimizer.compress(
            BasisSelectionConfig(params_ratio=0.05), train_dataset=pairs, save_dir=tmp_path / "out"
        )
    with pytest.raises(ValueError, match="no training pair keeps an answer token"):
        optimizer.compress(BasisSelectionConfig(seq_len=3), train_dataset=pairs, save_dir=tmp_path / "out")
    assert not list(tmp_path.iterdir())
    assert all(isinstance(m, nn.Linear) for m in [optimizer.model.model.layers[0].mlp.up_proj])


def test_config_round_trips_through_json():
    config = BasisSelectionConfig(params_ratio=0.6, bases="svd", new_rank=4, fine_tune_steps=3)
    assert BasisSelectionConfig.from_dict(json.loads(config.to_json_string())) == config
    with pytest.raises(ValueError, match="bases must be one of"):
        BasisSelectionConfig(bases="random")
    with pytest.raises(ValueError, match="num_rounds must be a positive integer"):
        BasisSelectionConfig(num_rounds=0)
