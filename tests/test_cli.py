"""`optimum-cli rom ...` end to end, run as a user would (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from optimum_rom import FactorizedLinear

OPTIMUM_CLI = str(Path(sys.executable).parent / "optimum-cli")


def optimum_cli(*args, env=None):
    return subprocess.run(
        [OPTIMUM_CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_compress_then_evaluate(model_dir, calibration_file, tmp_path):
    dense = model_dir("qwen2")
    result = optimum_cli(
        "rom", "compress", "--model", dense, "--method", "rom", "--params-ratio", 0.8, "--allocation", "paper",
        "--calibration", calibration_file, "--num-samples", 8, "--seq-len", 32, "--output", tmp_path / "rom",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "saved to" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rom")
    assert isinstance(model.model.layers[-1].mlp.up_proj, FactorizedLinear)

    result = optimum_cli(
        "rom", "evaluate", "--model", tmp_path / "rom", "--task", "wikitext2", "--data", calibration_file,
        "--seq-len", 32, "--max-windows", 3, "--output-json", tmp_path / "eval.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    wikitext = report["tasks"]["wikitext2"]
    assert wikitext["windows"] == 3 and wikitext["seq_len"] == 32 and wikitext["perplexity"] > 1
    assert report["parameters"] == model.num_parameters()
    assert "perplexity" in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "no/such/model"}, "model not found: 'no/such/model'"),
        ({"--params-ratio": "1.5"}, "params_ratio must be in (0, 1]"),
        ({"--params-ratio": "0.01"}, "out of reach"),
        ({"--calibration": "EMPTY"}, "is empty"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_output(
    change, message, model_dir, calibration_file, tmp_path
):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    options = {
        "--model": model_dir("llama"),
        "--calibration": calibration_file,
        "--num-samples": 4,
        "--seq-len": 16,
    }
    options.update({k: (empty if v == "EMPTY" else v) for k, v in change.items()})
    args = [item for pair in options.items() for item in pair]
    result = optimum_cli("rom", "compress", *args, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_broken_optimum_rom_does_not_break_optimum_cli(tmp_path):
    broken = tmp_path / "site" / "optimum_rom"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    env = {"PYTHONPATH": str(tmp_path / "site")}
    result = optimum_cli("export", "onnx", "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert "simulated broken install" in result.stderr
    assert optimum_cli("env", env=env).returncode == 0


def test_evaluate_rejects_unknown_task(tmp_path, calibration_file):
    result = optimum_cli("rom", "evaluate", "--model", tmp_path, "--task", "mmlu", "--data", calibration_file)
    assert result.returncode == 2 and "unknown task 'mmlu'" in result.stderr


def test_registering_the_commands_does_not_import_torch():
    """optimum-cli imports our register file on every call; it must stay light."""
    check = "import sys, optimum.commands.register.register_rom as r; print(len(r.REGISTER_COMMANDS), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "False"], result.stderr
    assert "rom" in optimum_cli("--help").stdout
