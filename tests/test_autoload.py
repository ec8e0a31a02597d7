"""Factorized checkpoints load in tools that never import optimum_rom (the installed start-up hook)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from optimum_rom import LowRankOptimizer, RomConfig

from .conftest import CALIBRATION_TEXT, tiny_model

BIN = Path(sys.executable).parent
TASK = """
task: rom_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def clean_env(**extra: str) -> dict[str, str]:
    """A fresh user's environment: no PYTHONPATH, nothing that imports the plugin, offline."""
    keep = ("PATH", "HOME", "LANG", "OMP_NUM_THREADS", "TMPDIR")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("autoload")
    tiny_model("llama").save_pretrained(directory / "dense")
    tokenizer.save_pretrained(directory / "dense")
    LowRankOptimizer.from_pretrained(directory / "dense").compress(
        RomConfig(params_ratio=0.8, num_samples=4, seq_len=16),
        calibration=CALIBRATION_TEXT,
        save_dir=directory / "rom",
        progress=False,
    )
    return directory / "rom"


PIPELINE = """
import sys
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, pipeline
assert "optimum_rom" not in sys.modules
generate = pipeline("text-generation", model=sys.argv[1], device="cpu")
print(type(generate.model.model.layers[0].self_attn.q_proj).__name__, "optimum_rom" in sys.modules)
generate("The city", max_new_tokens=3, do_sample=False)
prepared = Accelerator(cpu=True).prepare(AutoModelForCausalLM.from_pretrained(sys.argv[1]))
print(type(prepared.model.layers[0].mlp.up_proj).__name__)
"""


def test_a_pipeline_and_accelerate_load_the_factorized_model_without_importing_the_plugin(checkpoint):
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE, checkpoint],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FactorizedLinear", "True", "FactorizedLinear"]


def test_the_opt_out_leaves_transformers_untouched(checkpoint):
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE, checkpoint],
        capture_output=True,
        text=True,
        env=clean_env(OPTIMUM_ROM_NO_AUTOLOAD="1"),
        timeout=600,
        cwd=checkpoint.parent,
    )
    assert (
        result.returncode != 0 and "pip install optimum-rom" in result.stderr
    )  # refused, never random weights


def test_the_stock_lm_eval_cli_scores_a_factorized_checkpoint(checkpoint, tmp_path):
    data = tmp_path / "choices.jsonl"
    rows = [
        {"question": f"Question {i}: which is a colour?", "choices": ["red", "table"], "label": 0}
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rom_tiny_choice.yaml").write_text(TASK.format(data=data))
    command = [
        BIN / "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint},dtype=float32",
        "--tasks", "rom_tiny_choice", "--include_path", tmp_path / "tasks", "--limit", 4, "--batch_size", 2,
        "--device", "cpu", "--output_path", tmp_path / "results",
    ]  # fmt: skip
    result = subprocess.run(
        list(map(str, command)), capture_output=True, text=True, env=clean_env(), timeout=900, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(report.read_text())["results"]["rom_tiny_choice"]
    assert 0 <= scores["acc,none"] <= 1


INSTALLED = """
import site, sys
site.addsitedir(sys.argv[1])  # runs the .pth files there, as Python does for site-packages at start-up
sys.path.append(sys.argv[2])  # the dependencies, without this environment's own start-up files
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
print(AUTO_QUANTIZATION_CONFIG_MAPPING["rom"].__module__, sys.modules["optimum_rom_autoload"].__file__)
"""


def test_a_wheel_install_carries_the_bundled_data_and_the_start_up_hook(tmp_path):
    repository = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = pip + ["wheel", repository, "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel"]
    subprocess.run(list(map(str, build)), check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    install = pip + ["install", wheel, "--no-deps", "--target", tmp_path / "site"]
    subprocess.run(list(map(str, install)), check=True, capture_output=True, timeout=600)
    assert (
        tmp_path / "site" / "optimum_rom" / "data" / "wikitext2_valid_excerpt.txt"
    ).stat().st_size > 200_000
    dependencies = Path(transformers.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-S", "-c", INSTALLED, tmp_path / "site", dependencies],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
        cwd=tmp_path,  # not the repository, whose own optimum_rom_autoload.py would be found first
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "optimum_rom_autoload",
        str(tmp_path / "site" / "optimum_rom_autoload.py"),
    ]
