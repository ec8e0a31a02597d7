"""The block-by-block calibration walker every pass shares.

It runs the calibration tokens up to the first decoder block, then hands the passes one block
at a time together with the hidden states that enter it. After the pass has changed the block
(compressed it), the walker runs the *changed* block to produce the next block's inputs, so
errors of earlier blocks are seen by later ones, as ROM prescribes. Only one block's
activations are alive at a time, besides the (samples x seq_len x hidden) stream itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..structure import find_blocks


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what we need is recorded."""


# Tokens per chunk when running a block: large enough for efficient matmuls, small enough that a
# block's intermediate activations (e.g. 4096 x MLP width) stay in the tens of MB.
DEFAULT_TOKENS_PER_CHUNK = 4096


@dataclass
class BlockStep:
    """One decoder block, the hidden states entering it, and how to call it."""

    index: int
    name: str
    block: nn.Module
    inputs: torch.Tensor  # (samples, seq_len, hidden)
    call_kwargs: dict[str, Any] = field(repr=False)
    batch_size: int = 8

    def forward(self, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Run the block (as it is now) over ``inputs`` (default: this step's inputs), in chunks."""
        inputs = self.inputs if inputs is None else inputs
        outputs = torch.empty_like(inputs)
        with torch.no_grad():
            for start in range(0, inputs.shape[0], self.batch_size):
                chunk = inputs[start : start + self.batch_size]
                outputs[start : start + self.batch_size] = call_block(self.block, chunk, self.call_kwargs)
        return outputs


def call_block(block: nn.Module, hidden: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder block the way its model does; return the hidden states it produces."""
    kwargs = dict(call_kwargs)
    if kwargs.pop("_hidden_as_kwarg", False):
        output = block(hidden_states=hidden, **kwargs)
    else:
        output = block(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def capture_block_kwargs(model: nn.Module, blocks: nn.ModuleList, seq_len: int) -> list[dict[str, Any]]:
    """The keyword arguments (masks, rotary embeddings, ...) each block receives for a ``seq_len`` input.

    Recorded from one real single-sequence forward pass, so every architecture's own mask and
    position logic is used (including per-layer sliding-window masks). Tensors keep batch size 1
    and broadcast over any calibration batch.
    """
    recorded: list[dict[str, Any] | None] = [None] * len(blocks)

    def make_hook(index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden_as_kwarg = not args
            kwargs.pop("hidden_states", None)
            kwargs["_hidden_as_kwarg"] = hidden_as_kwarg
            recorded[index] = kwargs
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    probe = torch.zeros((1, seq_len), dtype=torch.long, device=_device_of(model))
    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if any(r is None for r in recorded):
        raise RuntimeError("not every decoder block was called during the probe forward pass")
    return recorded  # type: ignore[return-value]


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Hidden states entering the first block for every calibration sequence: (samples, seq_len, hidden)."""
    chunks: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        chunks.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                with contextlib.suppress(_StopForward):
                    model(
                        input_ids=input_ids[start : start + batch_size].to(_device_of(model)), use_cache=False
                    )
    finally:
        handle.remove()
    return torch.cat(chunks)


def walk_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    tokens_per_chunk: int = DEFAULT_TOKENS_PER_CHUNK,
    desc: str = "blocks",
    progress: bool = True,
) -> Iterator[BlockStep]:
    """Yield a :class:`BlockStep` per decoder block, in order.

    Between yields the caller may modify ``step.block``; the walker then runs the modified
    block over ``step.inputs`` to produce the next step's inputs.
    """
    blocks_name, blocks = find_blocks(model)
    samples, seq_len = input_ids.shape
    batch_size = max(1, tokens_per_chunk // seq_len)
    call_kwargs = capture_block_kwargs(model, blocks, seq_len)
    hidden = capture_block_inputs(model, blocks, input_ids, batch_size)
    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress)
    try:
        for index, block in enumerate(blocks):
            started = time.perf_counter()
            step = BlockStep(index, f"{blocks_name}.{index}", block, hidden, call_kwargs[index], batch_size)
            yield step
            hidden = step.forward()
            bar.set_postfix(block=index, seconds=f"{time.perf_counter() - started:.1f}")
            bar.update(1)
    finally:
        bar.close()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
