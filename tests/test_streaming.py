"""Streaming compression: block by block from disk, resumable, identical to the in-memory result."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from optimum_rom import LowRankOptimizer, RomConfig
from optimum_rom.checkpoint import PartialOutput, ensure_free_space
from optimum_rom.memory import MATMUL_CACHE_VARIABLES

from .conftest import tiny_model

CONFIG = dict(params_ratio=0.7, num_samples=8, seq_len=32)


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def weight_file_digests(directory):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in Path(directory).glob("*.safetensors")}


# what --preset auto streams: gradients (projected on each linear's output basis) and refinement
AUTO = {"allocation": "adaptive", "scoring": "direction", "refine_epochs": 1}


@pytest.mark.parametrize(
    ("arch", "shards", "options"),
    [
        ("llama", None, {}),
        ("gemma", None, {}),
        ("llama", "100KB", {}),
        ("llama", None, AUTO),
        ("gemma", None, AUTO),
        ("llama", None, {**AUTO, "refine_params": "block", "refine_schedule": "cosine"}),
        ("llama", None, {**AUTO, "scoring": "matrix"}),
        ("qwen2", None, {**AUTO, "metric": "fisher"}),
        ("llama", None, {**AUTO, "metric": "scored"}),
    ],
)
def test_streamed_and_in_memory_compression_give_the_same_model(
    arch, shards, options, model_dir, calibration_file, tokenizer, tmp_path
):
    dense = model_dir(arch)
    if shards:  # a model saved in several files streams the same
        dense = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(model_dir(arch)).save_pretrained(dense, max_shard_size=shards)
        tokenizer.save_pretrained(dense)
        assert len(list(dense.glob("model-*.safetensors"))) > 2
    source_digests = weight_file_digests(dense)
    streamed = LowRankOptimizer.from_pretrained(dense)
    streamed.compress(
        RomConfig(**CONFIG, **options),
        calibration=calibration_file,
        save_dir=tmp_path / "streamed",
        progress=False,
    )
    assert streamed.report.streamed
    # the weights are memory-mapped from the user's files; training them in place never writes there
    assert weight_file_digests(dense) == source_digests

    in_memory = LowRankOptimizer.from_pretrained(dense)
    assert in_memory.model.num_parameters() > 0  # loading the model first selects the in-memory path
    in_memory.compress(
        RomConfig(**CONFIG, **options),
        calibration=calibration_file,
        save_dir=tmp_path / "memory",
        progress=False,
    )
    assert not in_memory.report.streamed

    ids = torch.randint(0, 500, (2, 16))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    assert a.config.quantization_config.modules == b.config.quantization_config.modules


KILL_AFTER_SECOND_BLOCK = textwrap.dedent(
    """
    import json, os, signal, sys
    import optimum_rom.streaming as streaming
    from optimum_rom import LowRankOptimizer, RomConfig

    done = streaming.StreamingBlocks.done
    def done_then_die(self, index, *args):
        done(self, index, *args)
        if index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    streaming.StreamingBlocks.done = done_then_die
    model, calibration, output, options = sys.argv[1:]
    LowRankOptimizer.from_pretrained(model).compress(
        RomConfig(**json.loads(options)), calibration=calibration, save_dir=output, progress=False
    )
    """
)


# a Fisher-metric plan keeps its measured gradient covariances in the work directory for the rerun
@pytest.mark.parametrize(
    "options", [{}, {"target": "dense", "refine_epochs": 1}, AUTO, {**AUTO, "metric": "fisher"}]
)
def test_a_killed_run_resumes_and_produces_the_identical_checkpoint(
    options, model_dir, calibration_file, tmp_path, monkeypatch
):
    dense = model_dir("llama")
    config = {**CONFIG, **options}  # target="dense": the journal holds the dense stream too
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_AFTER_SECOND_BLOCK,
            dense,
            calibration_file,
            tmp_path / "out",
            json.dumps(config),
        ],
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()  # a partial run never looks like a checkpoint
    assert (tmp_path / ".out.partial" / "progress.json").is_file()

    if options.get("allocation") == "adaptive":  # the measured plan was kept: not measured again
        assert (tmp_path / ".out.work" / "progress.json").is_file()
        monkeypatch.setattr("optimum_rom.passes.rom.measure_damage", None)
    resumed = LowRankOptimizer.from_pretrained(dense)
    resumed.compress(
        RomConfig(**config), calibration=calibration_file, save_dir=tmp_path / "out", progress=False
    )
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / ".out.work").exists()
    monkeypatch.undo()

    LowRankOptimizer.from_pretrained(dense).compress(
        RomConfig(**config), calibration=calibration_file, save_dir=tmp_path / "uninterrupted", progress=False
    )
    assert digest(tmp_path / "out") == digest(tmp_path / "uninterrupted")


CTRL_C_AFTER_SECOND_BLOCK = textwrap.dedent(
    """
    import sys
    from argparse import ArgumentParser
    import optimum_rom.streaming as streaming
    from optimum.commands.register.register_rom import RomCompressCommand
    from optimum_rom.integrations.cli import run_command

    done = streaming.StreamingBlocks.done
    def done_then_interrupt(self, index, *args):
        done(self, index, *args)
        if index == 1:
            raise KeyboardInterrupt
    streaming.StreamingBlocks.done = done_then_interrupt
    model, calibration, output = sys.argv[1:]
    parser = ArgumentParser()
    RomCompressCommand.parse_args(parser)  # the command's own options, as optimum-cli parses them
    args = parser.parse_args([
        "--model", model, "--output", output, "--params-ratio", "0.7", "--calibration", calibration,
        "--num-samples", "8", "--seq-len", "32",
    ])
    run_command("compress", args)
    """
)


def test_ctrl_c_says_how_to_continue(model_dir, calibration_file, tmp_path):
    interrupted = subprocess.run(
        [
            sys.executable,
            "-c",
            CTRL_C_AFTER_SECOND_BLOCK,
            model_dir("llama"),
            calibration_file,
            tmp_path / "out",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert interrupted.returncode == 130, interrupted.stderr
    assert f"the finished work is kept in {tmp_path / '.out.partial'}" in interrupted.stderr
    assert "run the same command again to continue" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr


def test_a_partial_run_with_other_settings_is_started_afresh(model_dir, calibration_file, tmp_path):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "progress.json").write_text('{"fingerprint": "another run", "blocks_done": 2}')
    LowRankOptimizer.from_pretrained(model_dir("llama")).compress(
        RomConfig(**CONFIG), calibration=calibration_file, save_dir=tmp_path / "out", progress=False
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").num_parameters() > 0


def test_two_runs_cannot_write_the_same_output(tmp_path):
    first, second = PartialOutput(tmp_path / "out"), PartialOutput(tmp_path / "out")
    with first, pytest.raises(FileExistsError, match="another optimum-rom process"), second:
        pass


def test_half_precision_weights_are_computed_in_float32_and_saved_as_they_were(
    model_dir, calibration_file, tmp_path
):
    dense = model_dir("llama")
    AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    (dense / "tokenizer.json").rename(tmp_path / "bf16" / "tokenizer.json")
    compressed = LowRankOptimizer.from_pretrained(tmp_path / "bf16").compress(
        RomConfig(**CONFIG), calibration=calibration_file, save_dir=tmp_path / "out", progress=False
    )
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.self_attn.q_proj.down.weight").dtype == torch.bfloat16
    assert compressed.dtype == torch.bfloat16  # returned as saved, not converted (a whole float32 copy)


def test_quantized_or_integer_checkpoints_are_refused(model_dir, calibration_file, tmp_path):
    dense = model_dir("llama")
    config = (dense / "config.json").read_text()
    (dense / "config.json").write_text(
        config.replace('"architectures"', '"quantization_config": {"quant_method": "gptq"}, "architectures"')
    )
    with pytest.raises(ValueError, match=r"quantized \(quant_method='gptq'\).*float weights"):
        LowRankOptimizer.from_pretrained(dense).compress(
            RomConfig(**CONFIG), calibration=calibration_file, save_dir=tmp_path / "out"
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_overflowing_activations_name_the_block(model_dir, calibration_file, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    with torch.no_grad():  # finite weights whose outputs overflow float32
        model.model.layers[1].mlp.down_proj.weight[0] = 3e38
    optimizer = LowRankOptimizer(model, None)
    ids = torch.randint(0, 500, (4, 16))
    with pytest.raises(FloatingPointError, match="after block 1 contain NaN or Inf"):
        optimizer.compress(
            RomConfig(params_ratio=0.8, num_samples=4, seq_len=16), calibration=ids, progress=False
        )


def test_too_few_calibration_tokens_for_the_rank(model_dir, calibration_file, tmp_path):
    with pytest.raises(ValueError, match=r"calibration set has 16 tokens but the plan needs rank \d+"):
        LowRankOptimizer.from_pretrained(model_dir("llama")).compress(
            RomConfig(params_ratio=0.9, num_samples=1, seq_len=16),
            calibration=calibration_file,
            save_dir=tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


def test_not_enough_disk_space_is_reported_before_any_work(tmp_path, monkeypatch):
    usage = os.statvfs(tmp_path)
    free = usage.f_bavail * usage.f_frsize
    with pytest.raises(OSError, match="not enough disk space .* GiB are free; free some space"):
        ensure_free_space(tmp_path, free + 2**40)


def test_in_memory_half_precision_models_come_back_in_their_dtype(calibration_file, tokenizer):
    model = tiny_model("qwen2").to(torch.float16)
    compressed = LowRankOptimizer(model, tokenizer).compress(
        RomConfig(**CONFIG), calibration=calibration_file, progress=False
    )
    assert compressed.model.layers[0].self_attn.q_proj.down.weight.dtype == torch.float16


def test_an_already_compressed_model_is_refused(model_dir, calibration_file, tmp_path):
    optimizer = LowRankOptimizer.from_pretrained(model_dir("llama"))
    optimizer.compress(
        RomConfig(**CONFIG), calibration=calibration_file, save_dir=tmp_path / "rom", progress=False
    )
    with pytest.raises(ValueError, match="already compressed or quantized \\(quant_method='rom'\\)"):
        LowRankOptimizer.from_pretrained(tmp_path / "rom").compress(
            RomConfig(**CONFIG), calibration=calibration_file
        )


def test_the_peak_resident_memory_of_one_phase_is_measured_from_a_reset():
    from optimum_rom.memory import peak_resident_mib, reset_peak_resident

    ballast = b"\x01" * (256 * 2**20)  # written, so resident
    with_ballast = peak_resident_mib()
    del ballast
    reset_peak_resident()
    assert peak_resident_mib() < with_ballast - 200


@pytest.mark.parametrize(("environment", "expected"), [(None, "64"), ("8", "8")])
def test_the_matmul_caches_are_bounded_before_the_first_block_runs(
    environment, expected, model_dir, calibration_file, tmp_path, monkeypatch
):
    # each cache reads its bound once, at its first bfloat16 matmul: the measuring walk's, in `auto`
    import optimum_rom.calibration.walker as walker

    for variable in MATMUL_CACHE_VARIABLES:
        if environment is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, environment)  # the user's own wins
    seen = []
    call_block = walker.call_block

    def recording(*args):
        seen.extend(os.environ.get(variable) for variable in MATMUL_CACHE_VARIABLES)
        return call_block(*args)

    monkeypatch.setattr(walker, "call_block", recording)
    LowRankOptimizer.from_pretrained(model_dir("llama")).compress(
        RomConfig(**CONFIG, **AUTO), calibration=calibration_file, save_dir=tmp_path / "out", progress=False
    )
    assert seen and set(seen) == {expected}


@pytest.mark.parametrize("wide", [True, False])
def test_a_wide_model_maps_large_allocations_from_its_first_walk_a_narrow_one_in_the_compression(
    wide, model_dir, calibration_file, tmp_path, monkeypatch
):
    # glibc maps only what its free heap cannot serve: mapped only in the compression walk, a wide
    # model's measuring walks leave a heap in pieces that serves it (see memory.flat_peak_memory)
    import optimum_rom.calibration.walker as walker
    import optimum_rom.memory as memory

    if wide:
        monkeypatch.setattr(memory, "WIDE_MODEL_HIDDEN_SIZE", 1)  # the tiny model counts as wide
    thresholds, seen = [None], []
    monkeypatch.setattr(memory, "_set_mmap_threshold", thresholds.append)
    call_block = walker.call_block

    def recording(*args):
        seen.append(thresholds[-1])
        return call_block(*args)

    monkeypatch.setattr(walker, "call_block", recording)
    LowRankOptimizer.from_pretrained(model_dir("llama")).compress(
        RomConfig(**CONFIG, **AUTO), calibration=calibration_file, save_dir=tmp_path / "out", progress=False
    )
    if wide:
        assert set(seen) == {memory.LARGE_ALLOCATION_BYTES}
    else:  # the measuring walk on glibc's own dynamic threshold (None), the compression walk mapped
        assert seen[0] is None and seen[-1] == memory.LARGE_ALLOCATION_BYTES
    assert thresholds[-1] == memory.HEAP_ALLOCATION_BYTES  # what follows (healing) runs on the heap


# A training step through linears of ever new ranks, as refinement makes block after block; prints
# how much the resident memory grew between the 20th and the 40th shape.
NEW_SHAPES = """
import gc
from optimum_rom.memory import bound_matmul_cache, peak_resident_mib, return_freed_memory, reset_peak_resident
bound_matmul_cache()
import torch
torch.manual_seed(0)
x = torch.randn(256, 256)
for step in range(40):
    down, up = torch.nn.Linear(256, 40 + step, bias=False), torch.nn.Linear(40 + step, 256, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up(down(x.clone().requires_grad_())).float().sum().backward()
    del down, up
    gc.collect()
    return_freed_memory()
    if step == 19:
        reset_peak_resident()
        before = peak_resident_mib()
print(peak_resident_mib() - before)
"""


def test_bounded_matmul_caches_stop_growing_with_new_shapes():
    def growth(capacity: str | None) -> float:
        env = {k: v for k, v in os.environ.items() if k not in MATMUL_CACHE_VARIABLES}
        env.update(dict.fromkeys(MATMUL_CACHE_VARIABLES, capacity) if capacity else {})
        result = subprocess.run(
            [sys.executable, "-c", NEW_SHAPES], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return float(result.stdout.split()[-1])

    unbounded = growth("1024")
    if unbounded < 15:
        pytest.skip(f"bfloat16 matmuls here keep no per-shape primitives ({unbounded:.0f} MiB for 20 shapes)")
    assert growth(None) < unbounded / 4
