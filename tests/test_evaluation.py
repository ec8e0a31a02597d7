import math

import pytest
import torch

from optimum_rom.evaluation import stream_perplexity, text_perplexity

from .conftest import VOCAB_SIZE, tiny_model


def test_a_model_that_predicts_uniformly_has_perplexity_equal_to_the_vocabulary(tokenizer, calibration_file):
    model = tiny_model("llama")
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: uniform over the vocabulary
    result = text_perplexity(model, tokenizer, calibration_file, seq_len=16, max_windows=4, progress=False)
    assert result.perplexity == pytest.approx(VOCAB_SIZE, rel=1e-4)
    assert (result.windows, result.seq_len, result.tokens) == (4, 16, 4 * 15)


def test_perplexity_is_exp_of_the_mean_token_loss():
    model = tiny_model("gemma")
    windows = torch.randint(0, 500, (3, 12))
    result = stream_perplexity(model, windows, progress=False)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result.nll == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll))


def test_bad_evaluation_input(tokenizer, tmp_path, calibration_file):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="evaluation text not found"):
        text_perplexity(model, tokenizer, tmp_path / "missing.raw")
    short = tmp_path / "short.raw"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than one window"):
        text_perplexity(model, tokenizer, short, seq_len=64)
    with pytest.raises(ValueError, match="max_windows must be positive"):
        text_perplexity(model, tokenizer, calibration_file, max_windows=0)
