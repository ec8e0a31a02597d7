"""`optimum-cli rom compress --method basis-selection` and `rom evaluate --task gsm8k_loss`, as a user runs them."""

import json

from transformers import AutoModelForCausalLM

from optimum_rom import FactorizedLinear

from .test_cli import optimum_cli

FAST = ["--num-rounds", 2, "--steps-per-round", 1, "--batch-size", 2, "--seq-len", 64, "--num-samples", 16]


def write_math(path, count=24):
    rows = [
        {"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
        for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_compress_for_a_task_then_evaluate_on_its_held_out_records(model_dir, tmp_path):
    data = write_math(tmp_path / "math.jsonl")
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("llama"), "--method", "basis-selection", "--task-data", data,
        "--task", "gsm8k", "--holdout", 4, "--params-ratio", 0.8, *FAST, "--output", tmp_path / "bs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "with basis-selection" in result.stdout and "saved to" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bs")
    assert isinstance(model.model.layers[0].mlp.up_proj, FactorizedLinear)
    quantization = json.loads((tmp_path / "bs" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "basis_selection" and quantization["num_rounds"] == 2

    result = optimum_cli(
        "rom", "evaluate", "--model", tmp_path / "bs", "--task", "gsm8k_loss", "--task-data", data, "--holdout", 4,
        "--output-json", tmp_path / "eval.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "eval.json").read_text())["tasks"]["gsm8k_loss"]
    assert scores["examples"] == 4 and scores["loss"] > 0


def test_custom_fields(model_dir, tmp_path):
    rows = [{"instruction": f"Echo {i}", "output": f"{i} {i}"} for i in range(12)]
    data = tmp_path / "echo.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("qwen2"), "--method", "basis-selection", "--task-data", data,
        "--prompt-field", "instruction", "--answer-field", "output", *FAST, "--output", tmp_path / "bs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_mistakes_give_one_line_and_no_output(model_dir, tmp_path):
    data = write_math(tmp_path / "math.jsonl")
    cases = [  # (the Python API's checks are tested in test_basis_selection.py)
        ([], "give --task-data PATH"),
        (["--task-data", data, "--answer-field", "solution"], "has no field 'solution'"),
        (["--task-data", data, "--num-rounds", 0], "num_rounds must be a positive integer"),
    ]
    for args, message in cases:
        result = optimum_cli(
            "rom", "compress", "--model", model_dir("llama"), "--method", "basis-selection", *args,
            "--output", tmp_path / "out",
        )  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()
