import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_rom import FactorizedLinear, LowRankOptimizer, RomConfig
from optimum_rom.checkpoint_format import FORMAT_TAG

from .conftest import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_automodel_reloads_exactly_the_saved_factorized_model(arch, model_dir, calibration_file, tmp_path):
    optimizer = LowRankOptimizer.from_pretrained(model_dir(arch))
    config = RomConfig(params_ratio=0.8, num_samples=8, seq_len=32)
    compressed = optimizer.compress(
        config, calibration=calibration_file, save_dir=tmp_path / "rom", progress=False
    )
    ids = torch.randint(0, 500, (2, 20))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rom")

    assert isinstance(reloaded.model.layers[0].mlp.down_proj, FactorizedLinear)
    assert reloaded.num_parameters() == compressed.num_parameters()
    torch.testing.assert_close(reloaded(ids).logits, compressed(ids).logits, rtol=0, atol=0)


def test_checkpoint_holds_only_factorized_weights_and_the_config(compressed_dir):
    checkpoint = compressed_dir("llama")
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "rom" and config["params_ratio"] == 0.8
    assert RomConfig.from_dict(config).modules == config["modules"]
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert weights.metadata()["format"] == FORMAT_TAG
    assert "model.layers.0.mlp.down_proj.down.weight" in keys
    assert "model.layers.0.mlp.down_proj.weight" not in keys


def test_resaving_a_loaded_model_round_trips(compressed_dir, tmp_path):
    checkpoint = compressed_dir("qwen2")
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    ids = torch.randint(0, 500, (1, 12))
    torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_a_sharded_checkpoint_reloads_exactly(compressed_dir, tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(compressed_dir("llama"))
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 500, (1, 12))
    torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_a_failed_compression_leaves_no_output_directory(compressed_dir, tmp_path):
    with pytest.raises(ValueError, match="out of reach"):
        compressed_dir("llama", "out", params_ratio=0.01)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_existing_output_directory_is_not_overwritten_by_default(compressed_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        compressed_dir("llama", "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_compressing_while_loading_is_refused_with_a_pointer_to_the_optimizer(model_dir):
    with pytest.raises(ValueError, match="LowRankOptimizer"):
        AutoModelForCausalLM.from_pretrained(model_dir("llama"), quantization_config=RomConfig())


def test_a_checkpoint_missing_factors_does_not_load(compressed_dir):
    checkpoint = compressed_dir("llama")
    weights = load_file(checkpoint / "model.safetensors")
    with safe_open(checkpoint / "model.safetensors", "pt") as handle:
        metadata = handle.metadata()
    del weights["model.layers.2.mlp.up_proj.down.weight"]
    save_file(weights, checkpoint / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="incomplete or corrupted.*model.layers.2.mlp.up_proj.down.weight"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_a_truncated_checkpoint_fails_loudly(compressed_dir):
    checkpoint = compressed_dir("llama")
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception, match="(?i)safetensors|incomplete|deserializ"):
        AutoModelForCausalLM.from_pretrained(checkpoint)
