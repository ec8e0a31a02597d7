"""Models placed by accelerate (device_map / offload), as a user with a bigger box would load them."""

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

from optimum_rom import LowRankOptimizer, RomConfig

from .conftest import tiny_model

CONFIG = RomConfig(params_ratio=0.7, num_samples=16, seq_len=32)


def calibration():
    return torch.randint(0, 500, (16, 32), generator=torch.Generator().manual_seed(0))


def test_a_model_dispatched_with_a_device_map_compresses_like_a_plain_one():
    plain = tiny_model("llama")
    dispatched = tiny_model("llama")
    blocks = {f"model.layers.{i}": "cpu" for i in range(len(dispatched.model.layers))}
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    # force_hooks: every block gets accelerate's device-alignment hook, as with several GPUs
    dispatched = dispatch_model(dispatched, device_map={**device_map, **blocks}, force_hooks=True)
    assert hasattr(dispatched.model.layers[0], "_hf_hook")

    expected = LowRankOptimizer.from_pretrained(plain).compress(
        CONFIG, calibration=calibration(), progress=False
    )
    result = LowRankOptimizer.from_pretrained(dispatched).compress(
        CONFIG, calibration=calibration(), progress=False
    )
    tokens = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(result(tokens).logits, expected(tokens).logits)


def test_offloaded_weights_are_refused_with_the_streaming_alternative():
    offloaded = cpu_offload(tiny_model("llama"), execution_device="cpu")
    with pytest.raises(ValueError, match="on the meta device .* streams it block by block"):
        LowRankOptimizer.from_pretrained(offloaded).compress(
            CONFIG, calibration=calibration(), progress=False
        )
