"""Streaming compression: a model far larger than RAM, one block in memory at a time.

The model is built on the ``meta`` device (no memory), the calibration tokens are embedded,
then each block's weights are read from the safetensors files, compressed, written straight
into their place in the output file and freed. Peak memory is the hidden states of the
calibration set plus one block, independent of depth.

After every block the output file, the hidden states entering the next block and a journal
are on disk, so a killed run started again with the same command continues from the last
finished block and produces the same checkpoint as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from .allocation import RankPlan
from .calibration.data import CalibrationSet
from .calibration.walker import BlockStream, embed_inputs
from .checkpoint import PartialOutput, SafetensorsWriter, TensorSpec, ensure_free_space
from .checkpoint_format import build_skeleton, weights_metadata, with_ranks
from .configs import LowRankConfig
from .memory import flat_peak_memory, return_freed_memory
from .structure import check_compressible, find_blocks, meta_model

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HIDDEN_FILE = "hidden.safetensors"


class LazyCheckpoint:
    """A Hugging Face model directory whose tensors are read on demand.

    ``model`` is the architecture on the meta device; :meth:`load` materializes the tensors
    under a module in float32 (views of the memory-mapped file when already float32) and
    :meth:`release` sends them back to meta, which unmaps them.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.config = AutoConfig.from_pretrained(self.directory)
        self.files = _weight_files(self.directory)
        self.specs: dict[str, TensorSpec] = {}
        for file, names in self.files.items():
            with safe_open(file, "pt") as handle:
                for name in names:
                    info = handle.get_slice(name)
                    dtype = info.get_dtype()
                    if dtype not in _DTYPES:
                        raise ValueError(
                            f"{name} in {file.name} has dtype {dtype}: the checkpoint holds quantized or integer "
                            "weights; optimum-rom needs float weights"
                        )
                    self.specs[name] = TensorSpec(tuple(info.get_shape()), _DTYPES[dtype])
        self.model = meta_model(self.config)
        check_compressible(self.model)
        self.model.eval()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored: read-only views of the file, whose pages leave memory with them.

        One file handle per tensor: tensors read through one handle share its memory map, whose
        pages stay resident until the last of them is freed; this way each dense weight leaves
        memory as soon as its factorization replaces it.
        """
        tensors = {}
        for file, stored in self.files.items():
            for name in (n for n in names if n in stored):
                with safe_open(file, "pt") as handle:
                    tensors[name] = handle.get_tensor(name)
        missing = set(names) - set(tensors)
        if missing:
            raise ValueError(
                f"{self.directory} has no tensor {sorted(missing)[0]!r}; streaming needs a checkpoint written by "
                "transformers' save_pretrained (load the model and save it once)"
            )
        return tensors

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every stored tensor, one at a time (each leaves memory once the caller drops it)."""
        for file, names in self.files.items():
            for name in names:
                with safe_open(file, "pt") as handle:
                    yield name, handle.get_tensor(name)

    def load(self, prefix: str) -> None:
        """Materialize every parameter and stored buffer under ``prefix`` (``""`` = the whole model)."""
        names = [n for n in self._tensor_names(prefix) if n in self.specs]
        for name, tensor in self.read(names).items():
            set_module_tensor_to_device(self.model, name, "cpu", value=tensor.float())
        self.model.tie_weights()  # a tied head shares the embedding just read, not its meta placeholder

    def release(self, prefix: str) -> None:
        for name in self._tensor_names(prefix):
            set_module_tensor_to_device(self.model, name, "meta")
        self.model.tie_weights()

    def _tensor_names(self, prefix: str) -> list[str]:
        return [
            name
            for name in self.model.state_dict(keep_vars=True)
            if not prefix or name == prefix or name.startswith(prefix + ".")
        ]

    def fingerprint(self) -> dict[str, object]:
        """What identifies the weights: file names, sizes and modification times."""
        return {str(f.name): [f.stat().st_size, f.stat().st_mtime_ns] for f in self.files}


class StreamingBlocks:
    """The walker's residency for streamed runs: load a block, and when done write it, free it, journal."""

    def __init__(
        self, source: LazyCheckpoint, blocks_name: str, writer: SafetensorsWriter, partial: PartialOutput
    ) -> None:
        self.source = source
        self.blocks_name = blocks_name
        self.writer = writer
        self.partial = partial

    def load(self, index: int, block: nn.Module) -> None:
        self.source.load(f"{self.blocks_name}.{index}")

    def done(
        self, index: int, block: nn.Module, hidden: torch.Tensor, reference: torch.Tensor | None
    ) -> None:
        prefix = f"{self.blocks_name}.{index}"
        state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        self.writer.write({name: tensor for name, tensor in state.items() if name in self.writer.specs})
        save_streams(self.partial.path / _HIDDEN_FILE, hidden, reference)
        self.partial.record(blocks_done=index + 1)
        self.source.release(prefix)
        return_freed_memory()


def output_specs(source: LazyCheckpoint, config: LowRankConfig, plan: RankPlan) -> dict[str, TensorSpec]:
    """Name, shape and dtype of every tensor of the compressed checkpoint, in file order.

    Factors keep the dtype of the dense weight they replace; tied weights the source does not
    store are not stored either.
    """
    final = copy.deepcopy(source.model)  # on the meta device: free
    build_skeleton(final, with_ranks(config, plan.ranks))
    specs = {}
    for name, tensor in final.state_dict(keep_vars=True).items():
        module, _, _ = name.rpartition(".")
        dense = module.rsplit(".", 1)[0] if module.endswith((".down", ".up")) else None
        if dense in plan.ranks:
            specs[name] = TensorSpec(tuple(tensor.shape), source.specs[f"{dense}.weight"].dtype)
        elif name in source.specs:
            specs[name] = source.specs[name]
    return specs


def streamed_memory(config: LowRankConfig) -> contextlib.AbstractContextManager:
    """A streamed run's large allocations mapped (memory.flat_peak_memory), as the run trains or not."""
    return flat_peak_memory(trains=getattr(config, "refine_epochs", 0) > 0)


def compress_streaming(
    source: LazyCheckpoint,
    tokenizer,
    config: LowRankConfig,
    plan: RankPlan,
    data: CalibrationSet,
    run: Callable[..., RankPlan],
    save_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Compress ``source`` block by block into ``save_dir``; resumes a killed run of the same command.

    Large allocations are memory-mapped while it runs (a flat peak), not in what follows (healing).
    """
    model = source.model
    blocks_name, _ = find_blocks(model)
    fingerprint = plan_fingerprint(source, config, data, plan.ranks)
    specs = output_specs(source, config, plan)
    with (
        streamed_memory(config),
        PartialOutput(save_dir, overwrite, fingerprint, resumable=True) as partial,
    ):
        writer = SafetensorsWriter(partial.path / "model.safetensors", specs, weights_metadata())
        # the output file, and the saved hidden states twice while a block's replace the previous ones
        streams = 1 + (getattr(config, "target", "local") == "dense")
        partial.size = writer.size + 2 * streams * data.input_ids.numel() * model.config.hidden_size * 4
        start = partial.progress.get("blocks_done", 0)
        if not partial.resumed:  # journaled only after the first block: a failure before it leaves nothing
            ensure_free_space(partial.path, partial.size)
            writer.create()
            for name in specs:  # embeddings, final norm, untied lm_head: copied one at a time
                if not name.startswith(blocks_name + "."):
                    writer.write(source.read([name]))
            save_streams(partial.path / _HIDDEN_FILE, embed_inputs(model, data.input_ids, source), None)
        # Copies: the walker updates the streams in place, and loaded tensors are read-only file views.
        saved = {name: tensor.clone() for name, tensor in load_file(partial.path / _HIDDEN_FILE).items()}
        residency = StreamingBlocks(source, blocks_name, writer, partial)
        stream = BlockStream(residency, start, saved["hidden"], saved.get("reference"))
        run(model, config, data, plan=plan, progress=progress, stream=stream)

        (partial.path / _HIDDEN_FILE).unlink()
        final_config = copy.deepcopy(source.config)
        final_config.quantization_config = with_ranks(config, plan.ranks).to_dict()
        final_config.save_pretrained(partial.path)
        generation_config = source.directory / "generation_config.json"
        if generation_config.is_file():
            shutil.copyfile(generation_config, partial.path / generation_config.name)  # not its mode
        if tokenizer is not None:
            tokenizer.save_pretrained(partial.path)
        return partial.finish()


def save_streams(path: Path, hidden: torch.Tensor, reference: torch.Tensor | None) -> None:
    """Replace the saved hidden states atomically, with our writer: the disk space is reserved first
    (a full disk is one clear error) and the file gets the user's umask (safetensors' own: 0600)."""
    streams = {"hidden": hidden} if reference is None else {"hidden": hidden, "reference": reference}
    temporary = path.with_name(f"{path.name}.tmp")
    writer = SafetensorsWriter(
        temporary, {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in streams.items()}
    )
    writer.create()
    writer.write(streams)
    temporary.replace(path)


def plan_fingerprint(
    source: LazyCheckpoint, config: LowRankConfig, data: CalibrationSet, ranks: dict[str, int] | None = None
) -> str:
    """What a streamed run's plan (and, with its ``ranks``, its output) is a function of."""
    from . import __version__

    calibration = hashlib.sha256(data.input_ids.numpy().tobytes())
    if data.loss_mask is not None:
        calibration.update(data.loss_mask.numpy().tobytes())
    identity = {
        "version": __version__,
        "source": str(source.directory.resolve()),
        "files": source.fingerprint(),
        "config": {k: v for k, v in config.to_dict().items() if k not in ("modules", "calibration")},
        "ranks": ranks,
        "calibration": calibration.hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _weight_files(directory: Path) -> dict[Path, list[str]]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files: dict[Path, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(directory / file, []).append(name)
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as handle:
            return {single: list(handle.keys())}
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or model.safetensors.index.json; streaming compression reads "
        "safetensors checkpoints (load the model and save it with save_pretrained once)"
    )
