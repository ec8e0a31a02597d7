"""Basis Selection end to end on the real SmolLM2-135M-Instruct, kept short (one round, one step)."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimum_rom import BasisSelectionConfig, FactorizedLinear, LowRankOptimizer  # noqa: E402
from optimum_rom.evaluation import answer_loss  # noqa: E402
from optimum_rom.model_sources import DEFAULT_MODEL  # noqa: E402
from optimum_rom.task_data import load_pairs, split_pairs  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k.train.jsonl"


@pytest.mark.skipif(not GSM8K.is_file(), reason="needs ../shared/data/gsm8k.train.jsonl")
def test_basis_selection_compresses_smollm2_for_math_and_reloads(tmp_path):
    train, held_out = split_pairs(load_pairs(GSM8K, "gsm8k"), validation=500, seed=0)
    optimizer = LowRankOptimizer.from_pretrained(DEFAULT_MODEL)
    dense = answer_loss(optimizer.model, optimizer.tokenizer, held_out[:16], progress=False)
    config = BasisSelectionConfig(
        params_ratio=0.9, num_rounds=1, steps_per_round=1, batch_size=2, num_samples=16, calibration_windows=4
    )

    compressed = optimizer.compress(config, train_dataset=train, save_dir=tmp_path / "bs", progress=False)

    assert optimizer.report.ratio == pytest.approx(0.9, rel=0.01)
    assert sum(isinstance(m, FactorizedLinear) for m in compressed.modules()) == 30 * 7  # tied head untouched
    after = answer_loss(compressed, optimizer.tokenizer, held_out[:16], progress=False)
    assert dense.loss < after.loss < 1.5 * dense.loss
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bs")
    prompt = optimizer.tokenizer(held_out[0].prompt, return_tensors="pt").input_ids
    torch.testing.assert_close(reloaded(prompt).logits, compressed(prompt).logits, rtol=0, atol=0)
