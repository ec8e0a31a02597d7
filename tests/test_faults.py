"""Bad input and OS faults through `optimum-cli rom ...`: one line naming the cause, exit code 2,
and every file that existed before is byte-identical afterwards.

The commands run in this process (optimum-cli's own entry point), so OS faults can be injected
where the OS would raise them: a full disk, a read-only file system, a denied permission.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from optimum.commands.optimum_cli import main as optimum_cli_main
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_rom.streaming as streaming
from optimum_rom.checkpoint import OUTPUT_MARKER

SMALL = ["--num-samples", 4, "--seq-len", 16]
Result = namedtuple("Result", "code stdout message")


@pytest.fixture
def rom(monkeypatch, capsys):
    """Run ``optimum-cli rom ...`` in this process; the message is the last line it printed to stderr."""

    def run(*args) -> Result:
        monkeypatch.setattr(sys, "argv", ["optimum-cli", "rom", *map(str, args)])
        capsys.readouterr()
        try:
            optimum_cli_main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        lines = [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip()]
        assert "Traceback" not in err
        return Result(code, out, lines[-1] if lines else "")

    return run


@pytest.fixture
def compress(rom, calibration_file):
    def run(model, output, *extra) -> Result:
        return rom(
            "compress",
            "--model",
            model,
            "--calibration",
            calibration_file,
            *SMALL,
            "--output",
            output,
            *extra,
        )

    return run


def snapshot(*directories: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mode of every file under ``directories``."""
    files = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return files


def user_files(directory: Path) -> Path:
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("my notes\n")
    (directory / "sub" / "data.bin").write_bytes(os.urandom(256))
    return directory


def hidden_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def assert_refused(result: Result, *phrases: str) -> None:
    assert result.code == 2, result
    assert result.message.startswith("optimum-cli rom ") and ": error: " in result.message
    for phrase in phrases:
        assert phrase in result.message


# -- never destroy what the user has -------------------------------------------------------------


@pytest.mark.parametrize("where", ["the model", "its parent", "inside it", "a symlink to it"])
def test_an_output_that_is_contains_or_is_inside_the_input_is_refused(where, compress, model_dir, tmp_path):
    dense = model_dir("llama")
    user_files(tmp_path / "mine")
    (tmp_path / "link").symlink_to(dense)
    output = {
        "the model": dense,
        "its parent": tmp_path,
        "inside it": dense / "rom",
        "a symlink to it": tmp_path / "link",
    }
    before = snapshot(tmp_path)
    assert_refused(compress(dense, output[where], "--overwrite"), "the input model")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["compress", "export"])
def test_overwrite_never_replaces_a_directory_of_user_files(
    command, rom, compress, model_dir, compressed_dir, tmp_path
):
    checkpoint = compressed_dir()
    output = user_files(tmp_path / "out")
    before = snapshot(tmp_path)
    if command == "compress":
        result = compress(model_dir("llama"), output, "--overwrite")
    else:
        result = rom("export", "--model", checkpoint, "--output", output, "--overwrite")
    assert_refused(result, "is not an optimum-rom output", "notes.txt")
    assert snapshot(tmp_path) == before and not hidden_leftovers(tmp_path)


def test_the_current_directory_is_never_the_output(compress, model_dir, tmp_path, monkeypatch):
    dense = model_dir("llama")
    monkeypatch.chdir(user_files(tmp_path / "work"))
    before = snapshot(tmp_path)
    assert_refused(compress(dense, ".", "--overwrite"), "current directory")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_previous_output_once_the_new_one_is_complete(compress, model_dir, tmp_path):
    dense = model_dir("llama")
    assert compress(dense, tmp_path / "out").code == 0
    (tmp_path / "notes.txt").write_text("beside the output\n")
    before = snapshot(dense, tmp_path / "notes.txt")
    assert compress(dense, tmp_path / "out", "--overwrite", "--params-ratio", 0.7).code == 0
    assert snapshot(dense, tmp_path / "notes.txt") == before
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["params_ratio"]
        == 0.7
    )
    assert sorted(hidden_leftovers(tmp_path)) == []
    # a file the user adds to an output makes it theirs: --overwrite then refuses it
    (tmp_path / "out" / "my-eval.json").write_text("{}")
    assert_refused(compress(dense, tmp_path / "out", "--overwrite"), "my-eval.json")


# -- never a silently wrong model ----------------------------------------------------------------


def edit_modules(directory: Path, name: str, rank: int | None) -> None:
    """Change (or, with ``None``, delete) one linear's rank in a checkpoint's config.json."""
    config = json.loads((directory / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    modules.pop(name) if rank is None else modules.update({name: rank})
    (directory / "config.json").write_text(json.dumps(config))


def test_factors_the_config_does_not_list_refuse_to_load(compressed_dir):
    checkpoint = compressed_dir()
    edit_modules(checkpoint, "model.layers.0.self_attn.q_proj", None)
    with pytest.raises(ValueError, match="do not belong together") as refused:
        AutoModelForCausalLM.from_pretrained(checkpoint)
    assert "model.layers.0.self_attn.q_proj" in str(refused.value)


@pytest.mark.parametrize(("rank", "says"), [(None, "no factors"), (7, "rank 7")])
def test_evaluate_refuses_a_config_that_disagrees_with_the_weights(
    rank, says, rom, compressed_dir, calibration_file
):
    checkpoint = compressed_dir()
    edit_modules(checkpoint, "model.layers.0.self_attn.q_proj", rank)
    result = rom(
        "evaluate", "--model", checkpoint, "--data", calibration_file, "--seq-len", 32, "--max-windows", 1
    )
    assert_refused(result, "config.json and the weights disagree on model.layers.0.self_attn.q_proj", says)


def test_a_streamed_compression_reports_the_linears_it_factorized(compress, model_dir, tmp_path):
    result = compress(model_dir("llama"), tmp_path / "out")
    assert result.code == 0 and "21 linears factorized" in result.stdout  # 3 blocks x 7 linears


def test_every_checkpoint_has_a_model_card(compress, model_dir, tmp_path):
    assert compress(model_dir("qwen2"), tmp_path / "out", "--allocation", "paper").code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    for expected in (
        "ROM",
        "decoder linears only",
        "whole model",
        "q_proj",
        "calibration",
        "pip install optimum-rom",
    ):
        assert expected in card
    assert "README.md" in json.loads((tmp_path / "out" / OUTPUT_MARKER).read_text())["files"]


# -- one line for every file and OS fault --------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_model_file_is_named(compress, rom, model_dir, compressed_dir, tmp_path):
    checkpoint = compressed_dir()
    dense = model_dir("llama")
    truncate(dense / "model.safetensors")
    truncate(checkpoint / "model.safetensors")
    before = snapshot(tmp_path)
    assert_refused(compress(dense, tmp_path / "out"), "model.safetensors is truncated or corrupted")
    assert_refused(
        rom("export", "--model", checkpoint, "--output", tmp_path / "onnx"), "truncated or corrupted"
    )
    assert snapshot(tmp_path) == before and not hidden_leftovers(tmp_path)


def test_invalid_json_in_config_is_named(compress, model_dir, tmp_path):
    dense = model_dir("llama")
    (dense / "config.json").write_text((dense / "config.json").read_text()[:-10])
    assert_refused(compress(dense, tmp_path / "out"), "config.json is not valid JSON")


def test_a_pickled_bin_is_refused_without_running_it(rom, model_dir, calibration_file):
    dense = model_dir("llama")
    torch.save(AutoModelForCausalLM.from_pretrained(dense), dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    result = rom("evaluate", "--model", dense, "--data", calibration_file, "--max-windows", 1)
    assert_refused(result, "pytorch_model.bin is not a plain PyTorch state dict")


def test_a_broken_gguf_is_named(compress, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(4000))
    assert_refused(compress(tmp_path / "model.gguf", tmp_path / "out"), "not a valid GGUF file")


def test_nan_weights_are_refused_before_any_work(compress, model_dir, tmp_path):
    dense = model_dir("llama")
    weights = load_file(dense / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, dense / "model.safetensors", metadata={"format": "pt"})
    assert_refused(compress(dense, tmp_path / "out"), "model.layers.1.mlp.down_proj.weight contains NaN")
    assert not hidden_leftovers(tmp_path) and not (tmp_path / "out").exists()


def test_an_unreadable_model_directory(compress, model_dir, tmp_path, monkeypatch):
    dense = model_dir("llama")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != dense and real_access(path, mode))
    assert_refused(compress(dense, tmp_path / "out"), "permission denied", str(dense))


def test_an_output_that_cannot_be_written(compress, model_dir, tmp_path, monkeypatch):
    dense = model_dir("llama")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    assert_refused(compress(dense, locked / "out"), "permission denied", str(locked))
    assert not any(locked.iterdir())


def test_an_output_on_a_read_only_file_system(compress, model_dir, tmp_path, monkeypatch):
    dense = model_dir("llama")
    real_statvfs = os.statvfs

    def read_only(path):
        result = real_statvfs(path)
        if Path(path) != tmp_path:
            return result
        return os.statvfs_result((*result[:8], result.f_flag | os.ST_RDONLY, result.f_namemax))

    monkeypatch.setattr(os, "statvfs", read_only)
    assert_refused(compress(dense, tmp_path / "out"), "read-only file system")


def test_not_enough_disk_space_up_front(compress, model_dir, tmp_path, monkeypatch):
    dense = model_dir("llama")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=100_000))
    assert_refused(compress(dense, tmp_path / "out"), "not enough disk space", "free some space")
    assert not hidden_leftovers(tmp_path) and not (tmp_path / "out").exists()


def test_a_disk_filling_up_mid_run_keeps_the_finished_blocks_and_resumes(
    compress, model_dir, tmp_path, monkeypatch
):
    dense = model_dir("llama")
    reservations, reserve = [], os.posix_fallocate

    def fill_after_first_block(descriptor, offset, length):  # model file, embeddings, block 0, block 1
        reservations.append(length)
        if len(reservations) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return reserve(descriptor, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fill_after_first_block)
    assert_refused(compress(dense, tmp_path / "out"), "disk full", "run the same command again to continue")
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["blocks_done"] == 1
    monkeypatch.undo()
    assert compress(dense, tmp_path / "out").code == 0
    assert compress(dense, tmp_path / "uninterrupted").code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "uninterrupted" / "model.safetensors"
    ).read_bytes()


def test_a_disk_filling_up_while_saving_leaves_nothing(compress, model_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    dense = model_dir("llama")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    result = compress(dense, tmp_path / "out", "--method", "svd")  # in memory: saved at the end
    assert_refused(result, "disk full while writing", "free some space and run the same command again")
    assert not hidden_leftovers(tmp_path) and not (tmp_path / "out").exists()


def test_an_os_error_nobody_foresaw_is_still_one_line(compress, model_dir, tmp_path, monkeypatch):
    def broken_disk(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / ".out.partial"))

    monkeypatch.setattr(streaming, "save_streams", broken_disk)
    assert_refused(compress(model_dir("llama"), tmp_path / "out"), "Input/output error", "check the device")
    assert not hidden_leftovers(tmp_path)


def test_ctrl_c_before_the_first_block_leaves_nothing(compress, model_dir, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming.StreamingBlocks, "done", interrupt)
    result = compress(model_dir("llama"), tmp_path / "out")
    assert result.code == 130 and "nothing was written" in result.message
    assert not hidden_leftovers(tmp_path)


def test_outputs_follow_the_umask(compress, model_dir, tmp_path, monkeypatch):
    dense = model_dir("llama")
    (dense / "generation_config.json").write_text('{"max_new_tokens": 8}')
    (dense / "generation_config.json").chmod(0o600)
    done = streaming.StreamingBlocks.done

    def interrupt_after_first_block(self, index, *args):
        done(self, index, *args)
        raise KeyboardInterrupt

    previous = os.umask(0o022)
    try:
        assert compress(dense, tmp_path / "out").code == 0
        monkeypatch.setattr(streaming.StreamingBlocks, "done", interrupt_after_first_block)
        assert compress(dense, tmp_path / "partial").code == 130
    finally:
        os.umask(previous)
    for path in [*(tmp_path / "out").iterdir(), *(tmp_path / ".partial.partial").iterdir()]:
        if path.name != ".lock":
            assert path.stat().st_mode & 0o777 == 0o644, path


# -- bad calibration and sizes -------------------------------------------------------------------


def test_a_binary_calibration_file_is_refused(rom, model_dir, tmp_path):
    (tmp_path / "program").write_bytes(bytes(range(256)) * 200 + b"\0" * 20000)
    result = rom(
        "compress",
        "--model",
        model_dir("llama"),
        "--calibration",
        tmp_path / "program",
        *SMALL,
        "--output",
        tmp_path / "out",
    )
    assert_refused(result, "looks binary")


def test_invalid_utf8_in_calibration_text_is_replaced_with_a_warning(calibration_file, tokenizer, tmp_path):
    from optimum_rom.calibration.data import read_text_source

    text = calibration_file.read_text()[:20000].replace("e", "é", 100)
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1", errors="replace"))
    with pytest.warns(UserWarning, match=r"0\.\d\d% of its characters were not valid UTF-8"):
        assert "\ufffd" in read_text_source(tmp_path / "latin1.txt")


def test_a_jsonl_file_that_is_not_utf8_is_named(rom, model_dir, tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    result = rom(
        "compress",
        "--model",
        model_dir("llama"),
        "--calibration",
        tmp_path / "data.jsonl",
        *SMALL,
        "--output",
        tmp_path / "out",
    )
    assert_refused(result, "data.jsonl:", "is not valid UTF-8")


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--seq-len", 100_000], "longer than the model's context (max_position_embeddings=256)"),
        (["--num-samples", 10_000_000, "--seq-len", 256], "GiB of memory"),
    ],
)
def test_sizes_beyond_the_model_or_the_machine_are_refused_before_loading_data(
    flags, phrase, compress, model_dir, tmp_path
):
    assert_refused(compress(model_dir("llama"), tmp_path / "out", *flags), phrase)
    assert not hidden_leftovers(tmp_path)
