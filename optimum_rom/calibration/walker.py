"""The block-by-block calibration walker every pass shares.

It runs the calibration tokens up to the first decoder block, then hands the passes one block
at a time together with the hidden states that enter it. After the pass has changed the block
(compressed it), the walker runs the *changed* block to produce the next block's inputs, so
errors of earlier blocks are seen by later ones, as ROM prescribes. Only one block's
activations are alive at a time, besides the (samples x seq_len x hidden) stream itself, which
is updated in place.

With a :class:`BlockResidency` the walker also works on a model whose weights are not in
memory: the residency loads each block before it is used and saves/frees it afterwards
(see ``optimum_rom.streaming``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..memory import return_freed_memory
from ..precision import autocast, compute_dtype
from ..structure import find_blocks


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what we need is recorded."""


# Size of the widest activation (the MLP's) of one chunk of calibration sequences run through a
# block: large enough for efficient matmuls, small enough that the block's intermediate
# activations stay in the tens of MB whatever the model's width (4096 tokens with SmolLM2's MLP
# of 1536, 1024 with an MLP of 6144).
CHUNK_ACTIVATION_BYTES = 24 * 2**20

# Tokens per forward-and-backward through a block (refinement's training steps, the gradient walk):
# enough for the matmuls to run at full speed whatever the model's width (one 128-token sequence at
# a time ran a 7B-shaped block's backward at half the pace of four).
BACKWARD_TOKENS = 1024


@dataclass
class BlockStep:
    """One decoder block, the hidden states entering it, and how to call it."""

    index: int
    name: str
    block: nn.Module
    inputs: torch.Tensor  # (samples, seq_len, hidden)
    call_kwargs: dict[str, Any] = field(repr=False)
    batch_size: int = 8
    # With a reference stream: the dense model's hidden states entering this block, and what the
    # dense block makes of them (the targets of error-correcting passes).
    reference_inputs: torch.Tensor | None = field(default=None, repr=False)
    reference_outputs: torch.Tensor | None = field(default=None, repr=False)
    # Set by a pass that ran the block, unchanged, over ``inputs``: the walker takes these as the
    # next block's inputs instead of running the block again.
    outputs: torch.Tensor | None = field(default=None, repr=False)
    # What the block's forwards multiply in (None: float32; see optimum_rom.precision).
    dtype: torch.dtype | None = None

    def call(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block (as it is now) on ``hidden``; what it returns is in ``hidden``'s dtype."""
        return call_block_in(self.dtype, self.block, hidden, self.call_kwargs)

    def forward(self, inputs: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run the block (as it is now) over ``inputs`` (default: this step's inputs), in chunks.

        ``out`` may be ``inputs`` itself: each chunk is read before its outputs are written.
        """
        inputs = self.inputs if inputs is None else inputs
        outputs = torch.empty_like(inputs) if out is None else out
        with torch.no_grad():
            for start in range(0, inputs.shape[0], self.batch_size):
                chunk = inputs[start : start + self.batch_size]
                outputs[start : start + self.batch_size] = self.call(chunk)
        return outputs


class BlockResidency(Protocol):
    """Where block weights live between steps (e.g. on disk, loaded one block at a time)."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def done(
        self, index: int, block: nn.Module, hidden: torch.Tensor, reference: torch.Tensor | None
    ) -> None: ...


class WeightSource(Protocol):
    """A model whose weights are not all in memory (``streaming.LazyCheckpoint``): the tensors named
    ``prefix`` or under it are read on :meth:`load` and dropped again on :meth:`release`."""

    def load(self, prefix: str) -> None: ...

    def release(self, prefix: str) -> None: ...


class ReadOnlyBlocks:
    """A walk's residency for measuring a model that stays unchanged: load each block, then drop it."""

    def __init__(self, weights: WeightSource, blocks_name: str) -> None:
        self.weights = weights
        self.blocks_name = blocks_name

    def load(self, index: int, block: nn.Module) -> None:
        self.weights.load(f"{self.blocks_name}.{index}")

    def done(
        self, index: int, block: nn.Module, hidden: torch.Tensor, reference: torch.Tensor | None
    ) -> None:
        self.weights.release(f"{self.blocks_name}.{index}")
        return_freed_memory()


@dataclass
class BlockStream:
    """How a walk runs: where blocks live and where it starts (``start`` > 0 resumes a run)."""

    residency: BlockResidency
    start: int = 0
    hidden: torch.Tensor | None = None  # the hidden states entering block ``start``
    reference: torch.Tensor | None = None  # the dense model's, when a reference stream is tracked


def call_block(block: nn.Module, hidden: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder block the way its model does; return the hidden states it produces."""
    kwargs = dict(call_kwargs)
    kwargs.pop("_tuple_output", None)
    if kwargs.pop("_hidden_as_kwarg", False):
        output = block(hidden_states=hidden, **kwargs)
    else:
        output = block(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def call_block_in(
    dtype: torch.dtype | None, block: nn.Module, hidden: torch.Tensor, call_kwargs: dict[str, Any]
) -> torch.Tensor:
    """:func:`call_block` multiplying in ``dtype`` (None: float32; see optimum_rom.precision); what it
    returns is in ``hidden``'s dtype."""
    with autocast(dtype, hidden.device):
        return call_block(block, hidden, call_kwargs).to(hidden.dtype)


def capture_block_kwargs(model: nn.Module, blocks: nn.ModuleList, seq_len: int) -> list[dict[str, Any]]:
    """The keyword arguments (masks, rotary embeddings, ...) each block receives for a ``seq_len`` input.

    Recorded from one single-sequence forward pass of the model in which every block is
    replaced by a recorder that passes its input through, so every architecture's own mask and
    position logic is used (including per-layer sliding-window masks) and no block weights are
    needed. Tensors keep batch size 1 and broadcast over any calibration batch.
    """
    hidden_size = model.get_input_embeddings().embedding_dim
    probe = torch.zeros((1, seq_len, hidden_size), device=_buffer_device(model))
    # Models either use a block's output directly or take element [0] of a tuple; the recorders
    # return a tensor first, and tuples if the next block then receives a sliced hidden state.
    for as_tuple in (False, True):
        recorded = _record_block_kwargs(model, blocks, probe, as_tuple)
        if recorded is not None:
            return recorded
    raise RuntimeError(f"could not trace how {type(model).__name__} calls its decoder blocks")


def _record_block_kwargs(
    model: nn.Module, blocks: nn.ModuleList, probe: torch.Tensor, as_tuple: bool
) -> list[dict[str, Any]] | None:
    recorded: list[dict[str, Any]] = []

    def make_recorder(index: int):
        def recorder(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if hidden.shape != probe.shape:
                raise StopForward  # the previous recorder returned the wrong kind of output
            kwargs["_hidden_as_kwarg"] = not args
            kwargs["_tuple_output"] = as_tuple
            recorded.append(kwargs)
            if index == len(blocks) - 1:
                raise StopForward
            return (hidden,) if as_tuple else hidden

        return recorder

    with replaced_forwards(blocks, make_recorder), torch.no_grad(), contextlib.suppress(StopForward):
        model(inputs_embeds=probe, use_cache=False)
    return recorded if len(recorded) == len(blocks) else None


@contextlib.contextmanager
def replaced_forwards(blocks: nn.ModuleList, make_forward: Callable[[int], Callable]) -> Iterator[None]:
    """Blocks whose forward is ``make_forward(index)`` for the duration (the model around them unchanged).

    An instance attribute shadows the class's forward (accelerate's hooks patch it the same way).
    """
    previous = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = make_forward(index)
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def head_logits(
    model: nn.Module, blocks: nn.ModuleList, hidden: torch.Tensor, call_kwargs: list[dict[str, Any]]
) -> torch.Tensor:
    """The model's logits when its last block outputs ``hidden``: the model's own final norm, head and
    logit processing, with no block run (every block hands ``hidden`` on)."""
    as_tuple = call_kwargs[-1]["_tuple_output"]

    def make_output(index: int):
        return lambda *args, **kwargs: (hidden,) if as_tuple else hidden

    with replaced_forwards(blocks, make_output):
        return model(inputs_embeds=hidden.detach().new_zeros(hidden.shape), use_cache=False).logits


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Hidden states entering the first block for every calibration sequence: (samples, seq_len, hidden)."""
    chunks: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        chunks.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                with contextlib.suppress(StopForward):
                    model(input_ids=input_ids[start : start + batch_size], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(chunks).float()


def embed_inputs(
    model: nn.Module, input_ids: torch.Tensor, weights: WeightSource | None = None
) -> torch.Tensor:
    """Hidden states entering the first block; with ``weights``, only the input embeddings are loaded, briefly."""
    _, blocks = find_blocks(model)
    batch_size = chunk_batch_size(blocks, input_ids.shape[1])
    if weights is None:
        return capture_block_inputs(model, blocks, input_ids, batch_size)
    embeddings = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embeddings)
    weights.load(name)
    try:
        return capture_block_inputs(model, blocks, input_ids, batch_size)
    finally:
        weights.release(name)


def chunk_batch_size(blocks: nn.ModuleList, seq_len: int) -> int:
    """Calibration sequences per chunk when running a block (see CHUNK_ACTIVATION_BYTES)."""
    widest = max((m.out_features for m in blocks[0].modules() if isinstance(m, nn.Linear)), default=1)
    return max(1, CHUNK_ACTIVATION_BYTES // (4 * widest * seq_len))


def backward_batch_size(chunk: int, seq_len: int) -> int:
    """Sequences per forward-and-backward through a block: about ``BACKWARD_TOKENS`` tokens, never more
    than a walk's ``chunk`` (which bounds the activations autograd keeps)."""
    return max(1, min(chunk, BACKWARD_TOKENS // seq_len))


def walk_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    desc: str = "blocks",
    progress: bool = True,
    stream: BlockStream | None = None,
    reference: bool = False,
    precision: str = "float32",
) -> Iterator[BlockStep]:
    """Yield a :class:`BlockStep` per decoder block, in order.

    Between yields the caller may modify ``step.block``; the walker then runs the modified
    block over ``step.inputs`` to produce the next step's inputs. With ``reference`` it also
    carries the dense model's own hidden states alongside (twice the activation memory, one
    more dense block pass per block). ``precision``: what the block forwards multiply in (see
    optimum_rom.precision); the hidden states between blocks stay float32.
    """
    blocks_name, blocks = find_blocks(model)
    seq_len = input_ids.shape[1]
    batch_size = chunk_batch_size(blocks, seq_len)
    call_kwargs = capture_block_kwargs(model, blocks, seq_len)
    start = stream.start if stream else 0
    hidden = (
        stream.hidden if stream is not None and stream.hidden is not None else embed_inputs(model, input_ids)
    )
    check_finite(hidden, "the embeddings")
    dtype = compute_dtype(precision, hidden.device)
    dense = None
    if reference:
        dense = stream.reference if stream is not None and stream.reference is not None else hidden.clone()
    bar = tqdm(total=len(blocks), initial=start, desc=desc, unit="block", disable=not progress)
    try:
        for index in range(start, len(blocks)):
            started = time.perf_counter()
            block = blocks[index]
            if stream is not None:
                stream.residency.load(index, block)
            step = BlockStep(
                index, f"{blocks_name}.{index}", block, hidden, call_kwargs[index], batch_size, dtype=dtype
            )
            if dense is not None:
                step.reference_inputs, step.reference_outputs = dense, step.forward(dense)
            yield step
            return_freed_memory()  # what the pass freed (dense weights, statistics) before the block runs
            if step.outputs is not None:
                hidden.copy_(step.outputs)
            else:
                step.forward(out=hidden)
            check_finite(hidden, f"block {index}")
            if dense is not None:
                dense = step.reference_outputs
            if stream is not None:
                stream.residency.done(index, block, hidden, dense)
            bar.set_postfix(block=index, seconds=f"{time.perf_counter() - started:.1f}")
            bar.update(1)
    finally:
        bar.close()


def check_finite(hidden: torch.Tensor, where: str) -> None:
    if not torch.isfinite(hidden).all():
        raise FloatingPointError(
            f"the hidden states after {where} contain NaN or Inf on the calibration data; the model's weights "
            "or the calibration text make it overflow (check the model in float32 on a few of these samples)"
        )


def _buffer_device(model: nn.Module) -> torch.device:
    for tensor in (*model.buffers(), *model.parameters()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
