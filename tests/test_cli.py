"""`optimum-cli rom ...` end to end, run as a user would (subprocesses)."""

import gzip
import importlib.util
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


def test_auto_preset_with_healing(model_dir, calibration_file, tmp_path):
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("llama"), "--preset", "auto", "--params-ratio", 0.7,
        "--heal-minutes", 0.02, "--calibration", calibration_file, "--num-samples", 8, "--seq-len", 32,
        "--output", tmp_path / "rom",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "with rom (adaptive)" in result.stdout
    saved = json.loads((tmp_path / "rom" / "config.json").read_text())["quantization_config"]
    assert (saved["allocation"], saved["target"], saved["heal_minutes"]) == ("adaptive", "local", 0.02)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rom")
    assert (
        model.num_parameters()
        <= 0.7 * 1.01 * AutoModelForCausalLM.from_pretrained(model_dir("llama")).num_parameters()
    )


def test_best_preset_heals_within_the_time_budget(model_dir, calibration_file, tmp_path):
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("llama"), "--preset", "best", "--time-budget", 0.3,
        "--params-ratio", 0.7, "--calibration", calibration_file, "--num-samples", 8, "--seq-len", 32,
        "--output", tmp_path / "rom",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "healed" in result.stdout
    saved = json.loads((tmp_path / "rom" / "config.json").read_text())["quantization_config"]
    assert (saved["allocation"], saved["time_budget"], saved["heal_minutes"]) == ("adaptive", 0.3, 0)


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


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed")
def test_compress_does_not_import_scikit_learn(model_dir, calibration_file, tmp_path):
    """transformers would import it (~0.1 GB) for assisted generation, which compression never runs."""
    command = [
        sys.executable, "-X", "importtime", "-m", "optimum.commands.optimum_cli", "rom", "compress",
        "--model", model_dir("llama"), "--calibration", calibration_file, "--num-samples", 8, "--seq-len", 32,
        "--output", tmp_path / "rom",
    ]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers.generation.candidate_generator" in result.stderr  # what would import it ran
    assert "sklearn" not in result.stderr


def write_data_dir(directory: Path, calibration_file: Path) -> Path:
    """Two items of every task, in the formats of the shared data folder."""
    directory.mkdir()
    arc = {"question": "Which is a colour?", "answerKey": "A",
           "choices": [{"label": "A", "text": "red"}, {"label": "B", "text": "table"}]}  # fmt: skip
    rows = {
        "boolq_validation.jsonl": {"question": "is it", "passage": "It is.", "idx": 0, "title": "t", "label": True},
        "piqa_validation.jsonl": {"goal": "Open a jar", "sol1": "twist", "sol2": "eat", "label": 0},
        "hellaswag_validation.jsonl": {"activity_label": "Cooking", "ctx": "A man cuts onions. he",
                                       "endings": ["cries.", "flies.", "sings.", "swims."], "label": 0},
        "winogrande_xl_validation.jsonl": {"sentence": "The cup fell because _ was slippery.", "option1": "the cup",
                                           "option2": "the table", "answer": "1"},
        "arc_easy_test.jsonl": arc,
        "arc_challenge_test.jsonl": arc,
        "openbookqa_test.jsonl": {**{k: v for k, v in arc.items() if k != "question"}, "question_stem": "Plants"},
        "gsm8k.test.jsonl": {"question": "1+1?", "answer": "1+1=2\n#### 2"},
        "gsm8k.train.jsonl": {"question": "2+2?", "answer": "2+2=4\n#### 4"},
        "HumanEval.jsonl": {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f",
                            "test": "def check(c):\n    assert c(1) == 1\n"},
    }  # fmt: skip
    for name, row in rows.items():
        (directory / name).write_text((json.dumps(row) + "\n") * 2)
    with gzip.open(directory / "HumanEval.jsonl.gz", "wt") as handle:
        handle.write((directory / "HumanEval.jsonl").read_text())
    (directory / "wiki.test.raw").write_text(calibration_file.read_text())
    return directory


def test_evaluate_every_task_writes_one_json_report(model_dir, calibration_file, tmp_path):
    data_dir = write_data_dir(tmp_path / "data", calibration_file)
    tasks = "wikitext2,boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,gsm8k,gsm8k_loss,humaneval"
    result = optimum_cli(
        "rom", "evaluate", "--model", model_dir("llama"), "--task", tasks, "--data-dir", data_dir,
        "--limit", 2, "--num-fewshot", 1, "--max-new-tokens", 16, "--seq-len", 32, "--max-windows", 2,
        "--output-json", tmp_path / "out" / "eval.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(report) >= {"model", "parameters", "config", "tasks", "summary", "seconds"}
    assert list(report["tasks"]) == tasks.split(",")
    assert report["config"]["limit"] == 2 and report["config"]["quantization_config"] is None
    for name, metrics in report["tasks"].items():
        assert metrics["seconds"] > 0, name
    for name in ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"):
        assert report["tasks"][name]["items"] == 2 and 0 <= report["tasks"][name]["acc"] <= 1
    assert report["tasks"]["gsm8k"]["items"] == 2 and report["tasks"]["humaneval"]["items"] == 2
    assert report["tasks"]["gsm8k_loss"]["examples"] == 2 and report["tasks"]["wikitext2"]["windows"] == 2
    assert report["summary"]["zero_shot_tasks"] == 7
    for name in ("wikitext2", "arc_challenge", "gsm8k", "humaneval", "zero-shot"):
        assert name in result.stdout


def test_evaluate_names_every_missing_data_file_before_loading_the_model(tmp_path):
    (tmp_path / "data").mkdir()
    result = optimum_cli(
        "rom", "evaluate", "--model", tmp_path / "no-model", "--task", "boolq,gsm8k", "--data-dir", tmp_path / "data"
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for name in ("boolq_validation.jsonl", "gsm8k.test.jsonl", "gsm8k.train.jsonl"):
        assert name in result.stderr
    result = optimum_cli("rom", "evaluate", "--model", tmp_path, "--task", "piqa")
    assert result.returncode == 2 and "--data-dir" in result.stderr


def test_compress_with_the_svd_baseline_needs_no_calibration(model_dir, tmp_path):
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("llama"), "--method", "svd", "--params-ratio", 0.8,
        "--ratio-of", "linears", "--output", tmp_path / "svd",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "svd" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "svd" and config["calibration"] is None
    assert config["ratio_of"] == "linears" and 0.79 < config["kept_ratios"]["linears"] <= 0.8
    kept = config["kept_ratios"]
    assert kept["model"] > 0.85
    assert (
        f"({kept['model']:.3f} of the model, {kept['linears']:.3f} of the decoder linears)" in result.stdout
    )


def test_a_chat_model_is_compressed_on_its_own_answers_and_scored_on_chat(
    chat_tokenizer, model_dir, tmp_path
):
    dense = model_dir("llama", with_tokenizer=chat_tokenizer)
    result = optimum_cli(
        "rom", "compress", "--model", dense, "--params-ratio", 0.8, "--num-samples", 8, "--seq-len", 48,
        "--calibration-mix", 0.25, "--answer-tokens", 8, "--output", tmp_path / "rom",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "rom" / "config.json").read_text())["quantization_config"]
    assert saved["calibration"] == (
        "self-generated answers to bundled prompts (greedy, up to 8 tokens) + 25% bundled WikiText-2 excerpt"
    )

    result = optimum_cli(
        "rom", "evaluate", "--model", tmp_path / "rom", "--task", "chat", "--limit", 3, "--max-new-tokens", 6,
        "--output-json", tmp_path / "chat.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    chat = json.loads((tmp_path / "chat.json").read_text())["tasks"]["chat"]
    assert chat["items"] == 3 and 0 <= chat["agreement"] <= 1 and chat["answer_ce"] > 0
    assert "> What is the capital of France?" in result.stdout and "dense:" in result.stdout


def test_chat_options_on_plain_text_are_one_clear_error(model_dir, calibration_file, tmp_path):
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("llama"), "--calibration", calibration_file,
        "--calibration-mix", 0.5, "--output", tmp_path / "rom",
    )  # fmt: skip
    assert result.returncode == 2 and "is plain text" in result.stderr and "Traceback" not in result.stderr
    result = optimum_cli(
        "rom", "compress", "--model", model_dir("llama"), "--calibration", "self", "--output", tmp_path / "rom"
    )  # fmt: skip
    assert result.returncode == 2 and "tokenizer has none" in result.stderr
    assert not (tmp_path / "rom").exists()
