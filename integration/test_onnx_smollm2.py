"""A compressed SmolLM2-135M-Instruct on onnxruntime: export, greedy generation, int8, the chat example."""

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimum_rom import LowRankOptimizer, RomConfig, export_onnx  # noqa: E402
from optimum_rom.evaluation import text_perplexity  # noqa: E402
from optimum_rom.model_sources import DEFAULT_MODEL  # noqa: E402

DATA = resources.files("optimum_rom") / "data"
CHAT_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_chat.py"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """ROM 0.9 of the attention and down projections (few, small eigenproblems: quick), fp32 and int8."""
    root = tmp_path_factory.mktemp("smollm2-onnx")
    optimizer = LowRankOptimizer.from_pretrained(DEFAULT_MODEL)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    config = RomConfig(params_ratio=0.9, num_samples=16, seq_len=64, target_modules=targets)
    optimizer.compress(
        config, calibration=DATA / "wikitext2_valid_excerpt.txt", save_dir=root / "rom", progress=False
    )
    fp32 = export_onnx(root / "rom", root / "fp32", progress=False)
    int8 = export_onnx(root / "rom", root / "int8", weights="int8", progress=False)
    return root, fp32, int8


def test_the_onnx_export_generates_the_pytorch_tokens_and_int8_keeps_the_quality(exported):
    root, fp32, int8 = exported
    assert fp32.graph == "fused" and fp32.factorized_linears == 30 * 5
    assert fp32.onnx_bytes > 3 * int8.onnx_bytes

    tokenizer = AutoTokenizer.from_pretrained(root / "rom")
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    pytorch = AutoModelForCausalLM.from_pretrained(root / "rom").generate(
        prompt, max_new_tokens=16, do_sample=False
    )
    onnx = ORTModelForCausalLM.from_pretrained(root / "fp32").generate(
        prompt, max_new_tokens=16, do_sample=False
    )
    assert torch.equal(onnx, pytorch)

    options = dict(seq_len=256, max_windows=4, progress=False)
    text = DATA / "wikitext2_test_excerpt.txt"
    before = text_perplexity(ORTModelForCausalLM.from_pretrained(root / "fp32"), tokenizer, text, **options)
    after = text_perplexity(ORTModelForCausalLM.from_pretrained(root / "int8"), tokenizer, text, **options)
    assert after.perplexity < 1.05 * before.perplexity


def test_the_chat_example_formats_like_the_chat_template_and_runs_without_torch(exported):
    root, _, _ = exported
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['onnx_chat.py', '--model', {str(root / 'int8')!r}, '--max-new-tokens', '24',"
        " '--prompt', 'What is the capital of France?', '--prompt', 'And of Germany?']\n"
        f"runpy.run_path({str(CHAT_EXAMPLE)!r}, run_name='__main__')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(" tokens in ") == 2  # one line of statistics per answer

    sys.path.insert(0, str(CHAT_EXAMPLE.parent))
    try:
        from onnx_chat import chat_prompt
    finally:
        sys.path.remove(str(CHAT_EXAMPLE.parent))
    tokenizer = AutoTokenizer.from_pretrained(root / "int8")
    ours = tokenizer(chat_prompt(QUESTION), add_special_tokens=False).input_ids
    assert ours == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
