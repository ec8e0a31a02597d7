"""The compressed SmolLM2-135M-Instruct still chats: self-calibration, then the chat task."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimum_rom import LowRankOptimizer, RomConfig  # noqa: E402
from optimum_rom.evaluation import EvaluationOptions, evaluate  # noqa: E402
from optimum_rom.model_sources import DEFAULT_MODEL  # noqa: E402


def test_self_calibrated_smollm2_keeps_answering_like_the_dense_model():
    optimizer = LowRankOptimizer.from_pretrained(DEFAULT_MODEL)
    config = RomConfig.from_preset("auto", params_ratio=0.9, num_samples=64, seq_len=128)
    model = optimizer.compress(config, progress=False)  # no calibration given: the model's own answers
    assert model.config.quantization_config.calibration.startswith("self-generated answers")

    options = EvaluationOptions(limit=24, progress=False, reference=DEFAULT_MODEL)
    chat = evaluate(model, optimizer.tokenizer, ["chat"], options=options)["tasks"]["chat"]
    assert chat["empty"] <= 0.05  # WikiText-2 calibration at 0.8: nine answers in ten empty
    assert chat["agreement"] >= 0.25 and chat["token_agreement"] >= 0.7
