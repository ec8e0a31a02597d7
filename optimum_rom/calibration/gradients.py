"""Loss gradients at every linear's output, with one block of weights in memory at a time.

A whole-model backward pass needs the whole model (and its activations) in memory. Instead,
the forward walk that measures the spectra keeps each block's input hidden states for the
gradient sequences (on disk); the backward then goes through the blocks in reverse order,
loads one block, recomputes its forward from its stored input and back-propagates the gradient
of its output. The gradient it finds at the block's input is the gradient at the previous
block's output. Autograd does the work inside a block; only the chaining between blocks is ours.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import ensure_free_space
from ..memory import return_freed_memory
from ..precision import compute_dtype
from ..structure import find_blocks
from ..training import frozen_except
from .data import CalibrationSet
from .walker import (
    BlockStep,
    WeightSource,
    backward_batch_size,
    call_block_in,
    chunk_batch_size,
    head_logits,
)

# Sequences per loss: the loss is averaged over the target tokens of each group, as a training
# batch of this many sequences would average it.
LOSS_GROUP = 8


class BlockInputs:
    """The hidden states entering each block for the gradient sequences, spilled to a directory.

    Memory-mapped back one block at a time, so depth costs disk, not memory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def append(self, hidden: torch.Tensor) -> None:
        torch.save(hidden.contiguous(), self.directory / f"{self.count}.pt")
        self.count += 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.load(self.directory / f"{index}.pt", mmap=True, weights_only=True)


class OutputGradients:
    """Mean over tokens and output features of (d loss / d output)^2 for the given linears, or, for
    a linear given an orthonormal output basis ``U``, the mean over tokens of ``(g . u_i)^2`` for
    each basis vector (the squared gradient along each direction ROM may drop).

    With a ``covariances`` directory, the backward also keeps every measured linear's gradient
    covariance ``E[g g^T]`` (out x out, float32), one file per block (:func:`covariance_file`): the
    metric a Fisher-weighted factorization minimizes its error in.

    Use: :meth:`record` every block's step of a forward walk over the dense model (it keeps the
    inputs of ``data``'s rows, and the block's bases), then :meth:`backward`. The loss is the
    model's next-token loss on ``data``'s target tokens (what the assistant says, for chat data).
    Weights are never given gradients, so no weight-sized buffer is allocated.
    """

    def __init__(
        self,
        model: nn.Module,
        data: CalibrationSet,
        scratch: Path | None = None,
        spill_bytes: int = 0,
        covariances: Path | None = None,
    ) -> None:
        self.model = model
        self.labels = data.labels()
        self.rows = _rows_with_targets(self.labels)
        _, blocks = find_blocks(model)
        hidden_bytes = len(self.rows) * self.labels.shape[1] * model.config.get_text_config().hidden_size * 4
        self._directory = tempfile.TemporaryDirectory(prefix=".rom-gradients-", dir=scratch)
        ensure_free_space(Path(self._directory.name), hidden_bytes * len(blocks) + spill_bytes)
        self.covariances = covariances
        self.inputs = BlockInputs(Path(self._directory.name))
        self.outputs: torch.Tensor | None = None
        self.call_kwargs: list[dict] = []

    def record(self, step: BlockStep, last: bool) -> None:
        """Keep what the backward needs of this block: its inputs, and the model's output after the
        last block."""
        inputs = step.inputs[self.rows]
        self.inputs.append(inputs)
        self.call_kwargs.append(step.call_kwargs)
        if last:
            self.outputs = step.forward(inputs)

    def keep_basis(self, index: int, name: str, basis: torch.Tensor) -> None:
        """Keep (on disk, float32) the output basis of a linear to be measured per direction, as soon
        as it is computed: a 7B-shaped block's bases together are ~0.7 GB."""
        torch.save({name: basis.float()}, self.inputs.directory / f"bases-{index}-{name}.pt")

    def backward(
        self,
        linears: dict[int, list[str]],
        weights: WeightSource | None = None,
        progress: bool = True,
        precision: str = "float32",
    ) -> dict[str, float | torch.Tensor]:
        """Gradients of the loss, block by block from the last; ``linears[block]`` names the linears to
        measure. A linear recorded with a basis gets a vector (one value per basis vector).

        ``precision``: what each block's recomputed forward, and so its backward, multiplies in (see
        optimum_rom.precision); the gradients between blocks and the head's are float32.
        """
        blocks_name, blocks = find_blocks(self.model)
        totals = {name: 0.0 for names in linears.values() for name in names}
        counts = dict.fromkeys(totals, 0)
        try:
            with frozen_except(self.model), torch.enable_grad():
                gradient = self._head_gradient(blocks_name, blocks, weights)
                seq_len = self.labels.shape[1]
                chunk = backward_batch_size(chunk_batch_size(blocks, seq_len), seq_len)
                dtype = compute_dtype(precision, gradient.device)
                bar = tqdm(total=len(blocks), desc="gradients", unit="block", disable=not progress)
                for index in reversed(range(len(blocks))):
                    if weights is not None:
                        weights.load(f"{blocks_name}.{index}")
                    bases = self._bases(index, dtype)
                    names = linears.get(index, [])
                    grams: dict[str, tuple[torch.Tensor, int]] | None = (
                        None if self.covariances is None else {}
                    )
                    hooks = [
                        self.model.get_submodule(name).register_full_backward_hook(
                            _accumulate(name, totals, counts, bases.get(name), grams)
                        )
                        for name in names
                    ]
                    try:
                        gradient = self._block_backward(blocks[index], index, gradient, chunk, dtype)
                        if grams:
                            save_file(
                                {name: gram / count for name, (gram, count) in grams.items()},
                                covariance_file(self.covariances, index),
                            )
                    finally:
                        for hook in hooks:
                            hook.remove()
                        if weights is not None:
                            weights.release(f"{blocks_name}.{index}")
                            return_freed_memory()
                    bar.update(1)
                bar.close()
        finally:
            self._directory.cleanup()
        return {name: totals[name] / max(counts[name], 1) for name in totals}

    def _bases(self, index: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Block ``index``'s kept bases in the dtype the block's backward multiplies in (None: float32,
        as saved): the projections need no more than the gradients' own precision, and in float64
        they would be twice as large."""
        bases = {}
        for file in self.inputs.directory.glob(f"bases-{index}-*.pt"):
            for name, basis in torch.load(file, weights_only=True).items():
                bases[name] = basis.to(dtype or torch.float32)
        return bases

    def _head_gradient(
        self, blocks_name: str, blocks: nn.ModuleList, weights: WeightSource | None
    ) -> torch.Tensor:
        """d loss / d (last block's output), through the model's own final norm, head and logit processing.

        Each group's loss is its mean over its target tokens; computed a sequence at a time (the
        logits of a group can be large) as that sequence's share of the group's sum.
        """
        outputs, labels = self.outputs, self.labels[self.rows]
        gradient = torch.zeros_like(outputs)
        head = _head_tensors(self.model, blocks_name)
        if weights is not None:
            for name in head:
                weights.load(name)
        try:
            for start in range(0, len(outputs), LOSS_GROUP):
                targets = (labels[start : start + LOSS_GROUP, 1:] != -100).sum()
                for row in range(start, min(start + LOSS_GROUP, len(outputs))):
                    hidden = outputs[row : row + 1].clone().requires_grad_()
                    logits = head_logits(self.model, blocks, hidden, self.call_kwargs)
                    loss = F.cross_entropy(
                        logits[0, :-1].float(), labels[row, 1:], ignore_index=-100, reduction="sum"
                    )
                    (loss / targets).backward()
                    gradient[row] = hidden.grad[0]
        finally:
            if weights is not None:
                for name in head:
                    weights.release(name)
        return gradient

    def _block_backward(
        self, block: nn.Module, index: int, gradient: torch.Tensor, chunk: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Back-propagate ``gradient`` (at the block's output) to the block's input, the block's
        forward multiplying in ``dtype`` (None: float32)."""
        inputs = self.inputs[index]
        previous = torch.empty_like(gradient)
        block.requires_grad_(False)  # freshly loaded weights too: no weight gradients
        for start in range(0, len(inputs), chunk):
            hidden = inputs[start : start + chunk].clone().requires_grad_()
            outputs = call_block_in(dtype, block, hidden, self.call_kwargs[index])
            outputs.backward(gradient[start : start + chunk])
            previous[start : start + chunk] = hidden.grad
        return previous


def covariance_file(directory: str | Path, block: int) -> Path:
    """Where :class:`OutputGradients` keeps block ``block``'s gradient covariances."""
    return Path(directory) / f"gradient-covariances-{block}.safetensors"


def load_covariances(directory: str | Path, block: int) -> dict[str, torch.Tensor]:
    """Block ``block``'s gradient covariances, by linear name (float64)."""
    return {name: gram.double() for name, gram in load_file(covariance_file(directory, block)).items()}


def _rows_with_targets(labels: torch.Tensor) -> torch.Tensor:
    """The sequences of every loss group that has a target token (a group without one has no loss)."""
    rows = [
        torch.arange(start, min(start + LOSS_GROUP, len(labels)))
        for start in range(0, len(labels), LOSS_GROUP)
        if (labels[start : start + LOSS_GROUP, 1:] != -100).any()
    ]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def _head_tensors(model: nn.Module, blocks_name: str) -> list[str]:
    """The weights past the blocks: every tensor outside them but the input embedding (unless the
    head shares it)."""
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    embedding = next(name for name, module in model.named_modules() if module is embeddings)
    return [
        name
        for name in model.state_dict(keep_vars=True)
        if not name.startswith(blocks_name + ".") and (tied or not name.startswith(embedding + "."))
    ]


def _accumulate(
    name: str,
    totals: dict,
    counts: dict[str, int],
    basis: torch.Tensor | None,
    grams: dict[str, tuple[torch.Tensor, int]] | None,
):
    """A backward hook adding up the squared output gradients: all together, or along each column
    of ``basis`` (per token: ``(g U)^2``); and into ``grams``, when given, their covariance
    ``g^T g``. The covariance sums in float32: one of a few thousand tokens loses nothing that
    matters to the damped metric, and at 7B's shapes a block's covariances are ~1.2 GB in float32,
    twice that in float64."""

    def hook(module, grad_input, grad_output):
        tokens = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1])
        if basis is None:
            totals[name] += tokens.double().pow(2).sum().item()
            counts[name] += tokens.numel()
        else:
            along = (tokens.to(basis.dtype) @ basis).double()  # the squares summed in float64
            totals[name] = totals[name] + along.pow(2).sum(0)
            counts[name] += len(tokens)
        if grams is not None:
            tokens = tokens.float()
            gram, seen = grams.get(name, (tokens.new_zeros(tokens.shape[1], tokens.shape[1]), 0))
            grams[name] = (gram.addmm_(tokens.T, tokens), seen + len(tokens))

    return hook
