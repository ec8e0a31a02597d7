import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from optimum_rom import FactorizedLinear, LoraFactorizedLinear


def train_a_few_steps(model, ids, steps=8):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_lora_with_dense_names_trains_saves_reloads_and_merges(compressed_dir, tmp_path):
    checkpoint = compressed_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    rank_before = model.model.layers[0].self_attn.q_proj.rank

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, LoraFactorizedLinear)
    ids = torch.randint(0, 500, (4, 24))
    losses = train_a_few_steps(peft_model, ids)
    assert losses[-1] < losses[0]
    adapted_logits = peft_model(ids).logits.detach()

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids).logits, adapted_logits)

    merged = peft_model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FactorizedLinear) and q_proj.rank == rank_before + 4
    torch.testing.assert_close(merged(ids).logits, adapted_logits, atol=1e-4, rtol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]["modules"]
    assert saved["model.layers.0.self_attn.q_proj"] == rank_before + 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(ids).logits, adapted_logits, atol=1e-4, rtol=1e-4)


def test_unmerge_restores_the_factors(compressed_dir):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir("llama"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    down_before = layer.base_layer.down.weight.detach().clone()
    layer.merge()
    assert layer.base_layer.rank == down_before.shape[0] + 2
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.down.weight, down_before)


def test_lora_on_the_factors_keeps_the_size(compressed_dir):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir("llama"))
    parameters = model.num_parameters()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj.down", "down_proj.up"]))
    ids = torch.randint(0, 500, (2, 16))
    train_a_few_steps(peft_model, ids, steps=2)
    merged = peft_model.merge_and_unload()
    assert merged.num_parameters() == parameters
