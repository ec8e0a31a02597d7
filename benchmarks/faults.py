"""Bad input and OS faults, tried as a new user would: one markdown table row per case.

Every case runs the real command (``optimum-cli rom ...``, or a Python snippet for
``from_pretrained``) as a subprocess on tiny Llama / Qwen2 / GPT-2 models in a fresh directory,
and records the exit code, the message (the last line of stderr), what it left behind and
whether every file that existed before is byte-identical afterwards::

    python benchmarks/faults.py                          # this checkout
    PYTHONPATH=OLD_CHECKOUT python benchmarks/faults.py  # another version of optimum_rom

Real faults, not mocks: read-only and full file systems are tmpfs mounts, permissions are
checked as the user ``nobody`` (``setpriv``), so the script needs root; cases it cannot set up
are reported as skipped. A verdict is ``ok`` when the exit code is the expected one, the
message names the cause (an expected phrase, no traceback), nothing is left behind but the
expected output and nothing that existed was changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
OPTIMUM_CLI = str(Path(sys.executable).parent / "optimum-cli")
GGUF = Path.home() / ".cache" / "optimum_rom" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL = ["--num-samples", "4", "--seq-len", "16"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@dataclass
class Outcome:
    code: int
    message: str
    leftovers: list[str]
    changed: list[str]
    stdout: str = ""


@dataclass
class Case:
    name: str
    run: Callable[[Path, Fixtures], Outcome]
    expect: int = 2
    phrase: str = ""  # what the message must contain (case-insensitive), all of "a|b" alternatives
    check: Callable[[Path, Outcome], bool] | None = None  # an extra condition on the result


@dataclass
class Fixtures:
    root: Path
    models: dict[str, Path] = field(default_factory=dict)

    def copy(self, name: str, destination: Path) -> Path:
        shutil.copytree(self.models[name], destination, symlinks=True)
        return destination


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file and directory under ``directory``: content hash (files) and mode."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if path.is_symlink():
            entries[relative] = (f"-> {os.readlink(path)}", 0)
        elif path.is_file():
            entries[relative] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        elif path.is_dir():
            entries[relative] = ("dir", path.stat().st_mode)
    return entries


def run_in(
    case_dir: Path,
    command: list[str],
    outputs: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: int = 600,
) -> Outcome:
    """Run ``command`` in ``case_dir``; leftovers are new paths outside ``outputs``."""
    before = snapshot(case_dir)
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=cwd or case_dir,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        timeout=timeout,
    )
    after = snapshot(case_dir)
    changed = [name for name, entry in before.items() if after.get(name) != entry]
    new = [name for name in after if name not in before]
    leftovers = [n for n in new if not any(n == o or n.startswith(o + "/") for o in outputs)]
    top = sorted({"/".join(n.split("/")[:2]) for n in leftovers})
    return Outcome(result.returncode, last_line(result.stderr), top, changed, result.stdout)


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if not lines:
        return ""
    message = lines[-1].strip()
    return f"Traceback: {message}" if "Traceback (most recent call last)" in stderr else message


def cli(*args: object) -> list[str]:
    return [OPTIMUM_CLI, *map(str, args)]


def python_snippet(code: str, *args: object) -> list[str]:
    return [PYTHON, "-c", code, *map(str, args)]


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny dense models saved as Hugging Face directories, and one compressed checkpoint.

MAKE_MODELS = """
import sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

root, text = Path(sys.argv[1]), sys.argv[2]
backend = Tokenizer(models.BPE(unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
backend.decoder = decoders.ByteLevel()
backend.train([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
configs = {
    "llama": LlamaConfig(**common, tie_word_embeddings=False),
    "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
    "gpt2": GPT2Config(vocab_size=512, n_embd=64, n_layer=3, n_head=4, n_positions=256),
}
for name, config in configs.items():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    GenerationConfig(max_new_tokens=8).save_pretrained(root / name)
"""


def build_fixtures(root: Path) -> Fixtures:
    fixtures = Fixtures(root)
    root.mkdir()
    calibration = root / "calibration.txt"
    import optimum_rom  # noqa: F401  (only to find the bundled text, whichever version is tested)

    shutil.copy(Path(optimum_rom.__file__).parent / "data" / "wikitext2_valid_excerpt.txt", calibration)
    subprocess.run([PYTHON, "-c", MAKE_MODELS, root, calibration], check=True, capture_output=True)
    for name in ("llama", "qwen2", "gpt2"):
        fixtures.models[name] = root / name
    fixtures.models["calibration"] = calibration
    result = subprocess.run(
        cli(
            "rom",
            "compress",
            "--model",
            root / "llama",
            "--calibration",
            calibration,
            *SMALL,
            "--output",
            root / "rom",
        ),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    fixtures.models["rom"] = root / "rom"
    return fixtures


def compress(model: Path, output: object, fixtures: Fixtures, *extra: object) -> list[str]:
    return cli(
        "rom", "compress", "--model", model, "--calibration", fixtures.models["calibration"], *SMALL, "--output", output, *extra
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Cases.


def simple_compress(*extra: object, model: str = "llama", setup: Callable[[Path], None] | None = None):
    """A compress of a copy of ``model`` into ``out`` with extra flags (and an optional setup step)."""

    def run(case: Path, fixtures: Fixtures) -> Outcome:
        dense = fixtures.copy(model, case / "model")
        if setup:
            setup(case)
        extra_args = [str(e).format(case=case) for e in extra]
        if "--calibration" in extra_args:
            command = cli("rom", "compress", "--model", dense, "--output", case / "out", *extra_args)
            if "--num-samples" not in extra_args:
                command += SMALL
        else:
            command = compress(dense, case / "out", fixtures, *extra_args)
        return run_in(case, command)

    return run


def write(path: str, content: bytes | str):
    def setup(case: Path) -> None:
        target = case / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def user_files(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("my notes\n")
    (directory / "sub").mkdir()
    (directory / "sub" / "data.bin").write_bytes(os.urandom(1000))


def output_is_model(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    return run_in(case, compress(dense, dense, fixtures, "--overwrite"))


def output_is_parent_of_model(case: Path, fixtures: Fixtures) -> Outcome:
    parent = case / "parent"
    user_files(parent)
    dense = fixtures.copy("llama", parent / "model")
    return run_in(case, compress(dense, parent, fixtures, "--overwrite"))


def output_inside_model(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    return run_in(case, compress(dense, dense / "rom", fixtures, "--overwrite"))


def output_is_symlink_to_model(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    (case / "link").symlink_to(dense)
    return run_in(case, compress(dense, case / "link", fixtures, "--overwrite"))


def overwrite_foreign_directory(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    user_files(case / "out")
    return run_in(case, compress(dense, case / "out", fixtures, "--overwrite"))


def export_overwrite_foreign_directory(case: Path, fixtures: Fixtures) -> Outcome:
    checkpoint = fixtures.copy("rom", case / "rom")
    user_files(case / "out")
    return run_in(case, cli("rom", "export", "--model", checkpoint, "--output", case / "out", "--overwrite"))


def output_is_cwd(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    work = case / "work"
    user_files(work)
    return run_in(case, compress(dense, ".", fixtures, "--overwrite"), cwd=work)


def overwrite_previous_output(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    first = subprocess.run(compress(dense, case / "out", fixtures), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    (case / "notes.txt").write_text("next to the output\n")
    # the output itself is replaced: exclude it from the byte-identity check
    outcome = run_in(case, compress(dense, case / "out", fixtures, "--overwrite", "--params-ratio", "0.7"))
    outcome.changed = [c for c in outcome.changed if not c.startswith("out")]
    return outcome


def overwrite_empty_directory(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    (case / "out").mkdir()
    outcome = run_in(case, compress(dense, case / "out", fixtures, "--overwrite"), outputs=("out",))
    outcome.changed = [c for c in outcome.changed if c != "out"]
    return outcome


DROP_MODULE = """
import json, sys
path = sys.argv[1] + "/config.json"
config = json.load(open(path))
del config["quantization_config"]["modules"]["model.layers.0.self_attn.q_proj"]
json.dump(config, open(path, "w"))
"""
LOAD = "import sys, optimum_rom; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"


def checkpoint_missing_module_entry(case: Path, fixtures: Fixtures) -> Outcome:
    checkpoint = fixtures.copy("rom", case / "rom")
    subprocess.run([PYTHON, "-c", DROP_MODULE, checkpoint], check=True)
    return run_in(case, python_snippet(LOAD, checkpoint))


def evaluate_missing_module_entry(case: Path, fixtures: Fixtures) -> Outcome:
    checkpoint = fixtures.copy("rom", case / "rom")
    subprocess.run([PYTHON, "-c", DROP_MODULE, checkpoint], check=True)
    data = fixtures.models["calibration"]
    return run_in(
        case,
        cli("rom", "evaluate", "--model", checkpoint, "--data", data, "--seq-len", 32, "--max-windows", 2),
    )


def streamed_report_counts(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    return run_in(case, compress(dense, case / "out", fixtures), outputs=("out",))


def as_nobody(case: Path) -> None:
    shutil.chown(case, "nobody")
    for path in case.rglob("*"):
        shutil.chown(path, "nobody")


def unreadable_model_dir(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    as_nobody(case)
    dense.chmod(0)
    try:
        return run_in(case, NOBODY + compress(dense, case / "out", fixtures), env={"HOME": str(case)})
    finally:
        dense.chmod(0o755)


def output_under_read_only_dir(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    (case / "locked").mkdir()
    as_nobody(case)
    (case / "locked").chmod(0o555)
    try:
        return run_in(
            case, NOBODY + compress(dense, case / "locked" / "out", fixtures), env={"HOME": str(case)}
        )
    finally:
        (case / "locked").chmod(0o755)


class Mount:
    """A tmpfs of ``size`` at ``path`` (root only), optionally read-only."""

    def __init__(self, path: Path, size: str, read_only: bool = False) -> None:
        self.path, self.size, self.read_only = path, size, read_only

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", self.path], check=True)
        if self.read_only:
            subprocess.run(["mount", "-o", "remount,ro", self.path], check=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", self.path], check=False)


def output_on_read_only_fs(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    with Mount(case / "ro", "5m", read_only=True) as mounted:
        return run_in(case, compress(dense, mounted / "out", fixtures))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def truncated_input_safetensors(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    truncate(dense / "model.safetensors")
    return run_in(case, compress(dense, case / "out", fixtures))


def invalid_config_json(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    (dense / "config.json").write_text((dense / "config.json").read_text()[:-20])
    return run_in(case, compress(dense, case / "out", fixtures))


NAN_WEIGHT = """
import sys
from safetensors.torch import load_file, save_file
path = sys.argv[1] + "/model.safetensors"
weights = load_file(path)
weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
save_file(weights, path, metadata={"format": "pt"})
"""


def nan_weights(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    subprocess.run([PYTHON, "-c", NAN_WEIGHT, dense], check=True)
    return run_in(case, compress(dense, case / "out", fixtures))


def fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` up to ``leave`` free bytes."""
    free = shutil.disk_usage(directory).free
    (directory / "filler").write_bytes(b"\0" * max(0, free - leave))


def disk_full_up_front(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    with Mount(case / "small", "5m") as mounted:
        fill(mounted, 200_000)
        return run_in(case, compress(dense, mounted / "out", fixtures))


FILL_AFTER_FIRST_BLOCK = """
import os, shutil, sys
import optimum_rom.streaming as streaming
from optimum.commands.optimum_cli import main

done = streaming.StreamingBlocks.done
def done_then_fill(self, index, *args):
    done(self, index, *args)
    if index == 0:
        target = os.path.join(os.environ["FILL_DIR"], "filler")
        with open(target, "wb") as handle:
            handle.write(b"\\0" * max(0, shutil.disk_usage(os.environ["FILL_DIR"]).free - 20_000))
streaming.StreamingBlocks.done = done_then_fill
sys.argv = ["optimum-cli", *sys.argv[1:]]
main()
"""


def disk_full_mid_run(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    with Mount(case / "small", "8m") as mounted:
        command = [PYTHON, "-c", FILL_AFTER_FIRST_BLOCK] + compress(dense, mounted / "out", fixtures)[1:]
        outcome = run_in(case, command, env={"FILL_DIR": str(mounted)})
        kept = [p.name for p in mounted.iterdir() if p.name != "filler"]
        outcome.leftovers = [f"small/{name}" for name in kept if name != ".out.partial"]
        if (mounted / ".out.partial" / "progress.json").is_file():
            outcome.message += " [resumable partial kept]"
        return outcome


FILL_BEFORE_SAVE = """
import os, shutil, sys
from optimum_rom import LowRankOptimizer
from optimum.commands.optimum_cli import main

save = LowRankOptimizer.save
def fill_then_save(self, *args, **kwargs):
    target = os.path.join(os.environ["FILL_DIR"], "filler")
    with open(target, "wb") as handle:
        handle.write(b"\\0" * max(0, shutil.disk_usage(os.environ["FILL_DIR"]).free - 20_000))
    return save(self, *args, **kwargs)
LowRankOptimizer.save = fill_then_save
sys.argv = ["optimum-cli", *sys.argv[1:]]
main()
"""


def disk_full_while_saving_in_memory(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    with Mount(case / "small", "8m") as mounted:
        command = [PYTHON, "-c", FILL_BEFORE_SAVE] + compress(
            dense, mounted / "out", fixtures, "--preset", "auto"
        )[1:]
        outcome = run_in(case, command, env={"FILL_DIR": str(mounted)})
        outcome.leftovers = [f"small/{p.name}" for p in mounted.iterdir() if p.name != "filler"]
        return outcome


def export_truncated_checkpoint(case: Path, fixtures: Fixtures) -> Outcome:
    checkpoint = fixtures.copy("rom", case / "rom")
    truncate(checkpoint / "model.safetensors")
    return run_in(case, cli("rom", "export", "--model", checkpoint, "--output", case / "onnx"))


PICKLE_BIN = """
import sys, torch
from transformers import AutoModelForCausalLM
directory = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(directory)
import os; os.remove(directory + "/model.safetensors")
torch.save(model, directory + "/pytorch_model.bin")  # a pickled module, not a state dict
"""


def evaluate_pickled_bin(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    subprocess.run([PYTHON, "-c", PICKLE_BIN, dense], check=True, capture_output=True)
    data = fixtures.models["calibration"]
    return run_in(
        case, cli("rom", "evaluate", "--model", dense, "--data", data, "--seq-len", 32, "--max-windows", 2)
    )


def truncated_gguf(command: str):
    def run(case: Path, fixtures: Fixtures) -> Outcome:
        if not GGUF.is_file():
            raise Skip(f"needs {GGUF}")
        target = case / "model.gguf"
        with GGUF.open("rb") as source:
            target.write_bytes(source.read(GGUF.stat().st_size // 2))
        if command == "compress":
            return run_in(case, compress(target, case / "out", fixtures))
        data = fixtures.models["calibration"]
        return run_in(case, cli("rom", "evaluate", "--model", target, "--data", data, "--max-windows", 1))

    return run


def binary_calibration(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    shutil.copy("/bin/ls", case / "ls")
    return run_in(
        case,
        cli(
            "rom",
            "compress",
            "--model",
            dense,
            "--calibration",
            case / "ls",
            *SMALL,
            "--output",
            case / "out",
        ),
    )


def latin1_calibration(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    text = fixtures.models["calibration"].read_text().replace("e", "é", 200)
    (case / "latin1.txt").write_bytes(text.encode("latin-1", errors="replace"))
    command = cli(
        "rom",
        "compress",
        "--model",
        dense,
        "--calibration",
        case / "latin1.txt",
        *SMALL,
        "--output",
        case / "out",
    )
    return run_in(case, command, outputs=("out",))


def output_follows_umask(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    (dense / "generation_config.json").chmod(0o600)  # the copy must not keep the source's mode
    command = ["sh", "-c", 'umask 022 && exec "$@"', "sh", *compress(dense, case / "out", fixtures)]
    outcome = run_in(case, command, outputs=("out",))
    modes = (
        {p.name: oct(p.stat().st_mode & 0o777) for p in (case / "out").iterdir()} if outcome.code == 0 else {}
    )
    wrong = {n: m for n, m in modes.items() if m != "0o644"}
    outcome.message = f"modes not 0644: {wrong}" if wrong else "every file 0644"
    outcome.changed = [c for c in outcome.changed if c != "model/generation_config.json"]
    return outcome


KILL_AFTER_BLOCK = """
import os, signal, sys
import optimum_rom.streaming as streaming
from optimum.commands.optimum_cli import main

done = streaming.StreamingBlocks.done
def done_then_stop(self, index, *args):
    done(self, index, *args)
    if index == 1:
        os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
streaming.StreamingBlocks.done = done_then_stop
sys.argv = ["optimum-cli", *sys.argv[1:]]
main()
"""


def partial_follows_umask(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    command = ["sh", "-c", 'umask 022 && exec "$@"', "sh", PYTHON, "-c", KILL_AFTER_BLOCK]
    command += compress(dense, case / "out", fixtures)[1:]
    outcome = run_in(case, command, env={"STOP_SIGNAL": "SIGKILL"}, outputs=(".out.partial",))
    partial = case / ".out.partial"
    modes = (
        {p.name: oct(p.stat().st_mode & 0o777) for p in partial.iterdir() if p.is_file()}
        if partial.is_dir()
        else {}
    )
    wrong = {n: m for n, m in modes.items() if m != "0o644"}
    outcome.code = 0 if modes and not wrong else 1
    outcome.message = f"partial modes not 0644: {wrong}" if wrong else f"partial files 0644: {sorted(modes)}"
    return outcome


def resume_after(signal_name: str):
    def run(case: Path, fixtures: Fixtures) -> Outcome:
        dense = fixtures.copy("llama", case / "model")
        command = [PYTHON, "-c", KILL_AFTER_BLOCK] + compress(dense, case / "out", fixtures)[1:]
        stopped = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "STOP_SIGNAL": signal_name}
        )
        expected = -signal.SIGKILL if signal_name == "SIGKILL" else 130
        if stopped.returncode != expected:
            return Outcome(stopped.returncode, last_line(stopped.stderr), [], [])
        outcome = run_in(case, compress(dense, case / "out", fixtures), outputs=("out",))
        reference = subprocess.run(compress(dense, case / "ref", fixtures), capture_output=True, text=True)
        same = (
            reference.returncode == 0
            and (case / "out/model.safetensors").read_bytes() == (case / "ref/model.safetensors").read_bytes()
        )
        outcome.message = f"stopped: {last_line(stopped.stderr)[:60]}; resumed output byte-identical: {same}"
        outcome.leftovers = [n for n in outcome.leftovers if n != "ref"]
        outcome.changed = [c for c in outcome.changed if not c.startswith(".out.partial")]  # consumed
        outcome.code = outcome.code if same else 1
        return outcome

    return run


HOLD_LOCK = """
import fcntl, os, sys, time
partial = sys.argv[1]
os.makedirs(partial, exist_ok=True)
handle = open(os.path.join(partial, ".lock"), "w")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


def two_writers(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD_LOCK, case / ".out.partial"], stdout=subprocess.PIPE, text=True
    )
    try:
        holder.stdout.readline()
        return run_in(case, compress(dense, case / "out", fixtures), outputs=(".out.partial",))
    finally:
        holder.kill()
        holder.wait()


def stale_partial_other_settings(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    (case / ".out.partial").mkdir()
    (case / ".out.partial" / "progress.json").write_text('{"fingerprint": "another run", "blocks_done": 2}')
    outcome = run_in(case, compress(dense, case / "out", fixtures), outputs=("out",))
    outcome.changed = [c for c in outcome.changed if not c.startswith(".out.partial")]
    if (case / ".out.partial").exists():
        outcome.leftovers.append(".out.partial")
    return outcome


def memory_estimate(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("llama", case / "model")
    command = compress(dense, case / "out", fixtures, "--num-samples", 2_000_000, "--seq-len", 256)
    return run_in(case, command, timeout=300)


def evaluate(*args: object):
    def run(case: Path, fixtures: Fixtures) -> Outcome:
        dense = fixtures.copy("llama", case / "model")
        (case / "data").mkdir()
        values = [
            str(a).format(model=dense, data=case / "data", text=fixtures.models["calibration"]) for a in args
        ]
        return run_in(case, cli("rom", "evaluate", *values))

    return run


def export_existing_output(case: Path, fixtures: Fixtures) -> Outcome:
    checkpoint = fixtures.copy("rom", case / "rom")
    write("out/keep.txt", "keep")(case)
    return run_in(case, cli("rom", "export", "--model", checkpoint, "--output", case / "out"))


def export_missing_model(case: Path, fixtures: Fixtures) -> Outcome:
    return run_in(case, cli("rom", "export", "--model", case / "nothing", "--output", case / "out"))


def already_compressed(case: Path, fixtures: Fixtures) -> Outcome:
    checkpoint = fixtures.copy("rom", case / "rom")
    return run_in(case, compress(checkpoint, case / "out", fixtures))


def quantized_config(case: Path) -> None:
    config = case / "model" / "config.json"
    data = json.loads(config.read_text())
    data["quantization_config"] = {"quant_method": "gptq"}
    config.write_text(json.dumps(data))


def missing_config(case: Path) -> None:
    (case / "model" / "config.json").unlink()


def happy_path_qwen2(case: Path, fixtures: Fixtures) -> Outcome:
    dense = fixtures.copy("qwen2", case / "model")
    outcome = run_in(case, compress(dense, case / "out", fixtures, "--allocation", "paper"), outputs=("out",))
    return outcome


class Skip(Exception):
    pass


# (name, flags, simple_compress options, phrase the message must contain)
COMPRESS_MISTAKES = [
    ("--params-ratio 1.5", ["--params-ratio", 1.5], {}, "params_ratio must be in"),
    ("--params-ratio 0", ["--params-ratio", 0], {}, "params_ratio must be in"),
    ("--params-ratio -0.2", ["--params-ratio", -0.2], {}, "params_ratio must be in"),
    ("--params-ratio nan", ["--params-ratio", "nan"], {}, "params_ratio must be in"),
    ("--params-ratio abc", ["--params-ratio", "abc"], {}, "invalid float value"),
    ("--params-ratio 0.01 (unreachable)", ["--params-ratio", 0.01], {}, "out of reach"),
    ("--num-samples 0", ["--num-samples", 0], {}, "num_samples must be"),
    ("--num-samples -3", ["--num-samples", -3], {}, "num_samples must be"),
    ("--seq-len 0", ["--seq-len", 0], {}, "seq_len must be"),
    ("--refine-epochs -1", ["--refine-epochs", -1], {}, "refine_epochs must be"),
    ("--heal-minutes -1", ["--heal-minutes", -1], {}, "heal_minutes must be"),
    ("--num-trailing-blocks 0", ["--allocation", "paper", "--num-trailing-blocks", 0], {}, "num_trailing_blocks must be"),
    ("--num-samples 1 --seq-len 8 (rank > tokens)", ["--num-samples", 1, "--seq-len", 8], {}, "calibration set has"),
    ("--calibration missing file", ["--calibration", "{case}/none.txt"], {}, "not found"),
    ("--calibration empty file", ["--calibration", "{case}/empty.txt"], {"setup": write("empty.txt", "")}, "is empty"),
    ("--calibration whitespace only", ["--calibration", "{case}/blank.txt"], {"setup": write("blank.txt", " \n\n \t\n")}, "is empty"),
    ("--calibration a directory", ["--calibration", "{case}"], {}, "is a directory"),
    ("--calibration jsonl without the field", ["--calibration", "{case}/c.jsonl"], {"setup": write("c.jsonl", '{"body": "x"}\n')}, "has no field 'text'"),
    ("--calibration jsonl with a broken line", ["--calibration", "{case}/c.jsonl"], {"setup": write("c.jsonl", '{"text": "a"}\n{oops\n')}, "not valid json"),
    ("--calibration too short for --seq-len", ["--calibration", "{case}/short.txt", "--num-samples", 4, "--seq-len", 64], {"setup": write("short.txt", "hello world")}, "fewer than seq_len"),
    ("--model that does not exist", ["--model", "{case}/nothing"], {}, "model not found"),
    ("--model dir without config.json", [], {"setup": missing_config}, "without config.json"),
    ("--model GPT-2 (Conv1D, no nn.Linear)", [], {"model": "gpt2"}, "nn.linear"),
    ("--model with a gptq quantization_config", [], {"setup": quantized_config}, "quant_method='gptq'"),
    ("--target-modules matching nothing", ["--target-modules", "nope"], {}, "matches no module"),
    ("--target-modules a norm", ["--target-modules", "input_layernorm"], {}, "not an nn.linear"),
    ("--output existing, no --overwrite", [], {"setup": write("out/keep.txt", "keep")}, "--overwrite"),
    ("--output is a file", [], {"setup": write("out", "a file")}, "is a file"),
    ("--method basis-selection without --task-data", ["--method", "basis-selection"], {}, "--task-data"),
]  # fmt: skip
EVALUATE_MISTAKES = [
    ("--task mmlu", ["--model", "{model}", "--task", "mmlu"], "unknown task"),
    ("--data missing", ["--model", "{model}", "--data", "{data}/none.raw"], "not found"),
    ("--data-dir without the task files", ["--model", "{model}", "--task", "boolq", "--data-dir", "{data}"], "boolq_validation.jsonl"),
    ("piqa without --data-dir", ["--model", "{model}", "--task", "piqa"], "--data-dir"),
    ("--task-data with two loss tasks", ["--model", "{model}", "--task", "gsm8k_loss,code_loss", "--task-data", "{text}"], "--task-data"),
    ("--model missing", ["--model", "{data}/none", "--data", "{text}"], "model not found"),
    ("--seq-len 1", ["--model", "{model}", "--data", "{text}", "--seq-len", 1], "seq_len must be"),
    ("--max-windows 0", ["--model", "{model}", "--data", "{text}", "--max-windows", 0], "max_windows must be"),
]  # fmt: skip

CASES = [
    # Data loss
    Case("compress --output = --model --overwrite", output_is_model, phrase="input model"),
    Case("compress --output PARENT-of-model --overwrite", output_is_parent_of_model, phrase="input model"),
    Case("compress --output inside the model dir", output_inside_model, phrase="input model"),
    Case("compress --output symlink-to-model --overwrite", output_is_symlink_to_model, phrase="input model"),
    Case("compress --overwrite into a dir of user files", overwrite_foreign_directory, phrase="not an optimum-rom output"),
    Case("export --overwrite into a dir of user files", export_overwrite_foreign_directory, phrase="not an optimum-rom output"),
    Case("compress --output . --overwrite (cwd has user files)", output_is_cwd, phrase="current directory|not an optimum-rom output"),
    Case("compress --overwrite over its own previous output", overwrite_previous_output, expect=0),
    Case("compress --overwrite into an empty dir", overwrite_empty_directory, expect=0),
    # Silent wrong model
    Case("from_pretrained, one quantization_config.modules entry deleted", checkpoint_missing_module_entry, expect=1, phrase="q_proj"),
    Case("evaluate, one modules entry deleted", evaluate_missing_module_entry, phrase="q_proj"),
    Case("streamed compress: report counts the factorized linears", streamed_report_counts, expect=0, check=lambda case, o: "21 linears factorized" in o.stdout),
    # OS and file faults
    Case("compress, unreadable model dir (as nobody)", unreadable_model_dir, phrase="permission"),
    Case("compress --output under a read-only dir (as nobody)", output_under_read_only_dir, phrase="permission"),
    Case("compress --output on a read-only file system", output_on_read_only_fs, phrase="read-only"),
    Case("compress, truncated model.safetensors", truncated_input_safetensors, phrase="truncated|corrupt"),
    Case("compress, invalid JSON in config.json", invalid_config_json, phrase="config.json"),
    Case("compress, NaN in a weight", nan_weights, phrase="nan"),
    Case("compress, disk full up front (5 MB tmpfs, 200 kB free)", disk_full_up_front, phrase="disk space"),
    Case("compress (streamed), disk fills after block 0", disk_full_mid_run, phrase="run the same command again"),
    Case("compress (in memory), disk fills before saving", disk_full_while_saving_in_memory, phrase="free"),
    Case("export, truncated checkpoint", export_truncated_checkpoint, phrase="truncated|corrupt"),
    Case("evaluate, pickled pytorch_model.bin", evaluate_pickled_bin, phrase="pytorch_model.bin"),
    Case("compress, truncated .gguf", truncated_gguf("compress"), phrase="gguf"),
    Case("evaluate, truncated .gguf", truncated_gguf("evaluate"), phrase="gguf"),
    Case("compress --seq-len 100000 (context 256)", simple_compress("--seq-len", 100000), phrase="max_position_embeddings"),
    Case("compress --num-samples 2000000 --seq-len 256 (RAM)", memory_estimate, phrase="memory"),
    Case("compress --calibration /bin/ls", binary_calibration, phrase="binary"),
    Case("compress --calibration latin-1 text (warns)", latin1_calibration, expect=0, check=lambda case, o: True),
    Case("output files follow the umask (generation_config 0600 in the source)", output_follows_umask, expect=0, check=lambda case, o: o.message == "every file 0644"),
    Case("partial files follow the umask (killed after block 1)", partial_follows_umask, expect=0),
    # Resume and lock
    Case("SIGKILL after block 1, rerun: byte-identical", resume_after("SIGKILL"), expect=0),
    Case("Ctrl-C after block 1, rerun: byte-identical", resume_after("SIGINT"), expect=0),
    Case("two writers on one output", two_writers, phrase="another optimum-rom process"),
    Case("partial of other settings is started afresh", stale_partial_other_settings, expect=0),
    # Numeric flags, calibration and model mistakes: (name, flags, phrase) below
    *(
        Case(name, simple_compress(*flags, **options), phrase=phrase)
        for name, flags, options, phrase in COMPRESS_MISTAKES
    ),
    Case("--model an already compressed checkpoint", already_compressed, phrase="already compressed"),
    Case("compress + paper allocation on Qwen2 (works)", happy_path_qwen2, expect=0),
    # Evaluate
    *(Case(f"evaluate {name}", evaluate(*flags), phrase=phrase) for name, flags, phrase in EVALUATE_MISTAKES),
    # Export
    Case("export --model missing", export_missing_model, phrase="model not found"),
    Case("export into an existing output, no --overwrite", export_existing_output, phrase="--overwrite"),
]  # fmt: skip


def verdict(case: Case, outcome: Outcome, case_dir: Path) -> str:
    problems = []
    if outcome.code != case.expect:
        problems.append(f"exit {outcome.code}, expected {case.expect}")
    if case.expect != 0:
        if outcome.message.startswith("Traceback") and case.expect == 2:  # exit 1: a Python API raising
            problems.append("traceback")
        elif case.phrase and not any(p.lower() in outcome.message.lower() for p in case.phrase.split("|")):
            problems.append("message does not name the cause")
    if outcome.changed:
        problems.append(f"changed: {', '.join(outcome.changed[:3])}")
    if outcome.leftovers:
        problems.append("left files behind")
    if case.check is not None and not case.check(case_dir, outcome):
        problems.append("check failed")
    return "ok" if not problems else "FAIL: " + "; ".join(problems)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=None, help="run the cases whose name contains this text (or one of a|b)"
    )
    parser.add_argument("--skip", default=None, help="skip the cases whose name contains this text")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args()
    import optimum_rom

    rows = [
        f"optimum_rom from {Path(optimum_rom.__file__).parent}",
        "",
        "| # | case | exit | message (last line of stderr) | leftovers | verdict |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="rom-faults-") as work:
        root = Path(work)
        os.chmod(root, 0o755)
        fixtures = build_fixtures(root / "fixtures")
        counts = {"ok": 0, "FAIL": 0, "skipped": 0}
        for number, case in enumerate(CASES, 1):
            if (args.only and not any(o in case.name for o in args.only.split("|"))) or (
                args.skip and args.skip in case.name
            ):
                continue
            case_dir = root / f"case{number:02d}"
            case_dir.mkdir()
            started = time.perf_counter()
            try:
                outcome = case.run(case_dir, fixtures)
                result = verdict(case, outcome, case_dir)
            except Skip as reason:
                outcome, result = Outcome(-1, str(reason), [], []), "skipped"
            message = outcome.message.replace("|", "\\|")
            message = message if len(message) <= 150 else message[:147] + "..."
            leftovers = ", ".join(outcome.leftovers) or "-"
            rows.append(f"| {number} | {case.name} | {outcome.code} | {message} | {leftovers} | {result} |")
            counts[result.split(":")[0]] += 1
            print(
                f"{number:2d} {time.perf_counter() - started:5.1f}s {result[:80]:80s} {case.name}",
                file=sys.stderr,
            )
    rows += [
        "",
        f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['skipped']} skipped of {sum(counts.values())}",
    ]
    table = "\n".join(rows)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
