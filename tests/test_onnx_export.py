"""ONNX export of factorized models: the stock optimum-cli path, `export_onnx`, int8, onnxruntime inference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_rom import export_onnx
from optimum_rom.checkpoint_format import factorized_ranks
from optimum_rom.evaluation import text_perplexity
from optimum_rom.export import (
    UnsupportedArchitectureError,
    linear_weights,
    quantize_blockwise,
    verify_factorized,
)

from .conftest import ARCHITECTURES, tiny_config

REPOSITORY = Path(__file__).resolve().parents[1]
OPTIMUM_CLI = str(Path(sys.executable).parent / "optimum-cli")


def float_parameters(onnx_file: Path) -> int:
    """Float weights stored in the graph (the fused graph's rotary tables and scalars aside): a
    re-densified linear would add ``in*out - rank*(in+out)`` of them."""
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    tensors = [
        i
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and not ("rotary" in i.name or i.name.startswith("const."))
    ]
    return sum(int(np.prod(i.dims)) for i in tensors)


def greedy(model, tokenizer, prompts: list[str], new_tokens: int = 10) -> torch.Tensor:
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    return model.generate(
        **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )


PROMPTS = ["The history of the city", "In 1990 , the team won the league"]


def test_the_stock_optimum_cli_exports_the_factorized_weights(compressed_dir, tmp_path):
    checkpoint = compressed_dir("llama")
    command = [
        OPTIMUM_CLI,
        "export",
        "onnx",
        "--model",
        checkpoint,
        "--task",
        "text-generation-with-past",
        tmp_path / "onnx",
    ]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    pytorch = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert verify_factorized(tmp_path / "onnx" / "model.onnx", factorized_ranks(pytorch)) == 21
    assert float_parameters(tmp_path / "onnx" / "model.onnx") <= pytorch.num_parameters()
    exported = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert torch.equal(greedy(exported, tokenizer, PROMPTS), greedy(pytorch, tokenizer, PROMPTS))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_onnx_keeps_two_thin_matmuls_and_generates_like_pytorch(arch, compressed_dir, tmp_path):
    checkpoint = compressed_dir(arch)
    report = export_onnx(checkpoint, tmp_path / "onnx", progress=False)

    assert report.graph == "fused" and report.weights == "fp32" and report.factorized_linears == 21
    assert report.logits_max_abs_diff < 1e-4
    onnx_file = tmp_path / "onnx" / "model.onnx"
    weights = linear_weights(onnx_file)
    assert weights["model.layers.0.mlp.down_proj.down"][0] == 160  # in_features of down_proj
    assert "model.layers.0.mlp.down_proj" not in weights
    pytorch = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert float_parameters(onnx_file) == pytorch.num_parameters()

    exported = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")  # left-padded batch, KV cache
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    assert torch.equal(greedy(exported, tokenizer, PROMPTS), greedy(pytorch, tokenizer, PROMPTS))


def test_a_left_padded_row_decodes_with_the_cache_as_it_would_alone(compressed_dir, tmp_path):
    export_onnx(compressed_dir("llama"), tmp_path / "onnx", progress=False)
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]

    def prompt_then_one_step(rows: list[list[int]]) -> torch.Tensor:
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes
        with torch.no_grad():
            prompt = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            step = model(
                input_ids=torch.full((len(rows), 1), 3),
                attention_mask=torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1),
                position_ids=positions[:, -1:] + 1,
                past_key_values=prompt.past_key_values,
            )
        return step.logits[:, -1]

    together = prompt_then_one_step(prompts)
    for row, prompt in enumerate(prompts):
        assert torch.allclose(together[row], prompt_then_one_step([prompt])[0], atol=1e-4)


def test_perplexity_runs_through_onnxruntime_like_through_pytorch(compressed_dir, calibration_file, tmp_path):
    checkpoint = compressed_dir("qwen2")
    export_onnx(checkpoint, tmp_path / "onnx", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    options = dict(seq_len=32, max_windows=3, progress=False)
    onnx_ppl = text_perplexity(
        ORTModelForCausalLM.from_pretrained(tmp_path / "onnx"), tokenizer, calibration_file, **options
    )
    torch_ppl = text_perplexity(
        AutoModelForCausalLM.from_pretrained(checkpoint), tokenizer, calibration_file, **options
    )
    assert onnx_ppl.perplexity == pytest.approx(torch_ppl.perplexity, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied embeddings; qwen2's q/k/v are Gemms
@pytest.mark.parametrize(
    ("weights", "embedding_bits", "smaller", "perplexity_change"),
    [("int8", 8, 2.0, 0.02), ("int4", 8, 2.2, 0.15), ("int4", 4, 2.3, 0.15)],
)
def test_weight_only_quantizes_every_linear_and_the_embedding_once(
    arch, weights, embedding_bits, smaller, perplexity_change, compressed_dir, calibration_file, tmp_path
):
    checkpoint = compressed_dir(arch)
    fp32 = export_onnx(checkpoint, tmp_path / "fp32", progress=False)
    quantized = export_onnx(
        checkpoint, tmp_path / weights, weights=weights, embedding_bits=embedding_bits, progress=False
    )

    assert quantized.weights == weights and quantized.block_size == 32
    graph = onnx.load(str(tmp_path / weights / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == 2 * 21 + 1 and "Gemm" not in ops  # + lm_head
    initializers = {i.name: i for i in graph.initializer}
    zero_points = [n.input[3] for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3]
    assert all(initializers[z].data_type == onnx.TensorProto.UINT8 for z in zero_points if z)  # fast kernels
    assert ops.count("GatherBlockQuantized") == 1
    bits = {
        node.name: next(a.i for a in node.attribute if a.name == "bits")
        for node in graph.node
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    linear_bits = int(weights[-1])
    assert {b for name, b in bits.items() if name.startswith("/model/layers.")} == {linear_bits}
    assert [b for name, b in bits.items() if "embed_tokens" in name] == [embedding_bits]
    head = next(b for name, b in bits.items() if name.startswith("/lm_head"))
    assert head == (embedding_bits if arch == "qwen2" else linear_bits)  # a tied head reads the table
    float_matrices = {
        i.name: list(i.dims)
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and not i.name.endswith("scales")
    }
    rotary = {float_matrices.pop(f"model.rotary_emb.{n}_cache", None) is not None for n in ("cos", "sin")}
    assert rotary == {True}
    float_bytes = 4 * sum(np.prod(dims) for dims in float_matrices.values())
    blocks = sum(np.prod(initializers[n.input[1]].dims[:2]) for n in graph.node if n.op_type == "MatMulNBits")
    assert float_bytes <= 2 * 4 * blocks  # per-block data only: a float offset a block (and block sums)
    tables = [i for i in graph.initializer if i.dims[:1] == [512] and i.data_type == onnx.TensorProto.UINT8]
    assert len(tables) == (1 if arch == "qwen2" else 2)  # a tied table is quantized once, read by both ops
    assert fp32.onnx_bytes > smaller * quantized.onnx_bytes
    verify_factorized(
        tmp_path / weights / "model.onnx", factorized_ranks(AutoModelForCausalLM.from_pretrained(checkpoint))
    )

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    options = dict(seq_len=32, max_windows=3, progress=False)
    before = text_perplexity(
        ORTModelForCausalLM.from_pretrained(tmp_path / "fp32"), tokenizer, calibration_file, **options
    )
    after = text_perplexity(
        ORTModelForCausalLM.from_pretrained(tmp_path / weights), tokenizer, calibration_file, **options
    )
    assert after.perplexity == pytest.approx(before.perplexity, rel=perplexity_change)


def test_blocks_wider_than_an_embedding_row_still_quantize_the_table(model_dir, tmp_path):
    export_onnx(model_dir("qwen2"), tmp_path / "int8", weights="int8", block_size=128, progress=False)

    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    blocks = {
        node.op_type if "embed" in node.name else node.name: next(
            a.i for a in node.attribute if a.name == "block_size"
        )
        for node in graph.node
        if node.op_type in ("GatherBlockQuantized", "MatMulNBits")
    }
    assert blocks.pop("GatherBlockQuantized") == blocks.pop("/lm_head/MatMulNBits") == 64  # a row: 64 wide
    assert set(blocks.values()) == {128}
    float_tables = [
        i.name
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and not i.name.endswith("scales")
    ]
    assert all("rotary" in name for name in float_tables)


def test_quantized_blocks_decode_to_the_weights_they_came_from():
    """The 4-bit packing (two values a byte, low nibble first) read back as onnxruntime reads it."""
    weight = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    for bits, largest in ((8, 127), (4, 7)):
        packed, scales = quantize_blockwise(weight, bits, block_size=16)
        assert packed.shape == (6, 4, 16 * bits // 8) and scales.shape == (6, 4)
        values = packed if bits == 8 else np.stack([packed & 15, packed >> 4], axis=-1).reshape(6, 4, 16)
        decoded = (values.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
        assert np.abs(decoded.reshape(6, 64) - weight).max() <= scales.max() / 2 + 1e-6
        assert np.abs(values.astype(int) - 2 ** (bits - 1)).max() == largest


def test_dynamic_int8_goes_through_optimums_ort_quantizer(compressed_dir, tmp_path):
    checkpoint = compressed_dir("llama")
    report = export_onnx(
        checkpoint, tmp_path / "int8", weights="int8-dynamic", graph="optimum", progress=False
    )

    assert report.graph == "optimum" and report.weights == "int8-dynamic"
    assert json.loads((tmp_path / "int8" / "ort_config.json").read_text())["quantization"]["per_channel"]
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    quantized = {node.name for node in graph.node if node.op_type == "MatMulInteger"}
    assert "/model/layers.0/self_attn/q_proj/down/MatMul_quant" in quantized
    assert not any("/self_attn/MatMul" in name for name in quantized)  # attention products stay float
    ranks = factorized_ranks(AutoModelForCausalLM.from_pretrained(checkpoint))
    assert verify_factorized(tmp_path / "int8" / "model.onnx", ranks) == 21
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    generated = greedy(ORTModelForCausalLM.from_pretrained(tmp_path / "int8"), tokenizer, PROMPTS)
    assert generated.shape[0] == 2


def test_architectures_the_fused_graph_cannot_express_use_the_stock_exporter(model_dir, tmp_path, tokenizer):
    config = tiny_config("mistral")
    config.sliding_window = 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "sliding")
    tokenizer.save_pretrained(tmp_path / "sliding")

    with pytest.raises(UnsupportedArchitectureError, match="sliding-window"):
        export_onnx(tmp_path / "sliding", tmp_path / "fused", graph="fused", progress=False)
    assert not (tmp_path / "fused").exists()
    assert export_onnx(tmp_path / "sliding", tmp_path / "auto", progress=False).graph == "optimum"


def test_a_failed_export_leaves_no_output_directory(compressed_dir, tmp_path, monkeypatch):
    import optimum_rom.export.exporter as exporter

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure after the graph was written")

    monkeypatch.setattr(exporter, "compare_with_pytorch", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(compressed_dir("llama"), tmp_path / "onnx", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".onnx", "onnx"))]


def test_cli_export_then_evaluate_on_onnxruntime(compressed_dir, calibration_file, tmp_path):
    checkpoint = compressed_dir("llama")

    def run(*args):
        return subprocess.run(
            [OPTIMUM_CLI, "rom", *map(str, args)], capture_output=True, text=True, timeout=600
        )

    result = run("export", "--model", checkpoint, "--output", tmp_path / "onnx", "--int8")
    assert result.returncode == 0, result.stderr
    assert (
        "fused graph, int8 weight-only, blocks of 32" in result.stdout
        and "21 factorized linears" in result.stdout
    )

    result = run(
        "export", "--model", checkpoint, "--output", tmp_path / "int4", "--int4", "--block-size", "16"
    )
    assert result.returncode == 0, result.stderr
    assert "fused graph, int4 weight-only, blocks of 16" in result.stdout
    for wrong, message in (
        (["--int4", "--block-size", "24"], "block_size must be a power of two >= 16"),
        (["--block-size", "64"], "--block-size is for the weight-only formats"),
        (["--embedding-bits", "4"], "--embedding-bits is for the weight-only formats"),
        (["--int4", "--int8"], "not allowed with argument"),
    ):
        result = run("export", "--model", checkpoint, "--output", tmp_path / "wrong", *wrong)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "wrong").exists()
    result = run("export", "--model", checkpoint, "--output", tmp_path / "onnx")
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    result = run("export", "--model", tmp_path / "missing", "--output", tmp_path / "other")
    assert result.returncode == 2 and "model not found" in result.stderr and not (tmp_path / "other").exists()

    result = run("evaluate", "--model", tmp_path / "onnx", "--data", calibration_file, "--seq-len", 32,
                 "--max-windows", 2, "--output-json", tmp_path / "eval.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["onnx_bytes"] > 0 and report["tasks"]["wikitext2"]["perplexity"] > 1


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_the_chat_example_runs_on_onnxruntime_alone(graph, compressed_dir, tmp_path):
    checkpoint = compressed_dir("llama")
    export_onnx(checkpoint, tmp_path / "onnx", graph=graph, progress=False)
    chat = REPOSITORY / "examples" / "onnx_chat.py"
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['onnx_chat.py', '--model', {str(tmp_path / 'onnx')!r}, '--max-new-tokens', '8',"
        " '--prompt', 'Hello there', '--prompt', 'And then?']\n"
        f"runpy.run_path({str(chat)!r}, run_name='__main__')\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr

    sys.path.insert(0, str(chat.parent))
    try:
        from onnx_chat import chat_prompt
    finally:
        sys.path.remove(str(chat.parent))
    tokenizer = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    ids = tokenizer.encode(
        chat_prompt([{"role": "user", "content": "Hello there"}]), add_special_tokens=False
    ).ids
    pytorch = AutoModelForCausalLM.from_pretrained(checkpoint)
    generated = pytorch.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    expected = tokenizer.decode(
        [t for t in generated.tolist() if t != pytorch.generation_config.eos_token_id]
    )
    assert result.stdout.startswith(expected + "\n")


def test_the_chat_task_scores_an_export_against_the_pytorch_model_it_came_from(
    chat_tokenizer, model_dir, tmp_path
):
    from optimum_rom.evaluation import EvaluationOptions
    from optimum_rom.evaluation.suite import evaluate_model

    dense = model_dir("llama", with_tokenizer=chat_tokenizer)
    export_onnx(dense, tmp_path / "fp32", progress=False)
    export_onnx(dense, tmp_path / "int4", weights="int4", progress=False)
    options = EvaluationOptions(limit=4, max_new_tokens=6, progress=False)

    reference = evaluate_model(dense, ["chat"], options=options)["tasks"]["chat"]
    fp32 = evaluate_model(tmp_path / "fp32", ["chat"], options=options)["tasks"]["chat"]
    # Teacher-forced, the graph scores the dense answers as PyTorch does. (Free-running answers can
    # part on a near-tie of this random model's logits: onnxruntime's kernels round differently.)
    assert fp32["token_agreement"] == 1.0 and fp32["answer_tokens"] == reference["answer_tokens"]
    assert fp32["answer_ce"] == pytest.approx(reference["answer_ce"], rel=1e-4)
    assert fp32["agreement"] >= 0.5
    int4 = evaluate_model(tmp_path / "int4", ["chat"], options=options)["tasks"]["chat"]
    assert int4["items"] == 4 and int4["answer_ce"] > 0 and 0 <= int4["token_agreement"] <= 1
