"""benchmarks/quality.py on a tiny model: every method x ratio evaluated, reports written, resumable."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from optimum_rom.checkpoint import exclusive
from optimum_rom.task_data import load_pairs, split_pairs

from .conftest import SHARED_DATA
from .test_cli import write_data_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_results_table_and_plot_and_resumes(
    quality, model_dir, calibration_file, tmp_path, capsys
):
    data_dir = write_data_dir(tmp_path / "data", calibration_file)
    argv = [
        "--model", str(model_dir("llama")), "--ratios", "1.0,0.8", "--methods", "rom-uniform,svd",
        "--tasks", "wikitext2,arc_easy", "--data-dir", str(data_dir), "--limit", "2", "--seq-len", "32",
        "--max-windows", "2", "--calibration", str(calibration_file), "--num-samples", "4",
        "--calibration-seq-len", "16", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    quality.main(argv)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["runs"]) == {"dense", "rom-uniform@0.8", "svd@0.8"}
    for run in results["runs"].values():
        assert set(run["tasks"]) == {"wikitext2", "arc_easy"}
    assert results["runs"]["svd@0.8"]["compression"]["ratio"] == pytest.approx(0.8, rel=0.02)
    assert 100 < results["runs"]["svd@0.8"]["compression"]["peak_resident_mib"] < 8192
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| svd | 0.8 |" in table and "WikiText-2 ppl" in table and "Wall time" in table
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    assert (tmp_path / "out" / "models" / "svd-0.8" / "config.json").is_file()

    capsys.readouterr()
    quality.main(argv)  # everything cached: nothing recompressed or re-evaluated
    assert "0 evaluations to run (6 already done)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings"):
        quality.main([*argv, "--limit", "3"])
    with exclusive(tmp_path / "out", "the folder"), pytest.raises(FileExistsError, match="another benchmark"):
        quality.main(argv)  # another process holds the folder


def test_methods_are_a_table_of_config_factories(quality):
    assert set(quality.METHODS) >= {"rom-paper", "rom-uniform", "svd"}
    config = quality.METHODS["rom-paper"].config(0.7, num_samples=8, seq_len=16)
    assert (config.params_ratio, config.allocation, config.num_samples) == (0.7, "paper", 8)


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k.train.jsonl").exists(), reason="needs ../shared/data")
def test_built_data_dir_has_every_file_and_the_exact_gsm8k_held_out_split(quality, tmp_path):
    data_dir = quality.build_data_dir(SHARED_DATA, tmp_path / "data")
    for task in quality.TASKS.values():
        for name in set(task.files) - set(task.bundled):  # the chat prompts come with the package
            assert (data_dir / name).is_file(), name
    held_out = split_pairs(load_pairs(SHARED_DATA / "gsm8k.train.jsonl", "gsm8k"), validation=500, seed=0)[1]
    assert load_pairs(data_dir / "gsm8k.test.jsonl", "gsm8k") == held_out
    assert len(load_pairs(data_dir / "gsm8k.train.jsonl", "gsm8k")) == 7473 - 500
    assert json.loads((data_dir / "gsm8k.test.jsonl").read_text().splitlines()[0]).keys() == {
        "question",
        "answer",
    }
