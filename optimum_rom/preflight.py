"""What a run will need, checked against what the model and the machine allow, before any work.

A sequence longer than the model's context, or calibration activations larger than the free
memory, would otherwise fail (or swap the machine to a halt) minutes into the run, after the
model and the data were loaded.
"""

from __future__ import annotations

import psutil

from .calibration.walker import CHUNK_ACTIVATION_BYTES
from .configs import LowRankConfig

FLOAT32 = 4
# Live (samples x seq_len x widest) buffers of one chunk inside a block: input, attention and
# MLP intermediates, output (measured peak of a Llama block is about three chunk activations).
CHUNK_BUFFERS = 4


def check_context_length(model_config, seq_len: int) -> None:
    """Refuse a ``seq_len`` beyond the positions the model was trained for."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context (max_position_embeddings={context}); "
            f"use at most {context} tokens per sequence (CLI: --seq-len)"
        )


def calibration_memory(model_config, config: LowRankConfig) -> int:
    """Bytes the block-by-block calibration holds at its peak (an estimate).

    The hidden states of every calibration sequence (samples x seq_len x hidden, float32; ROM
    with ``target="dense"`` carries the dense model's stream and its block outputs too, block
    refinement the block's targets), the token ids, and one block's work on a chunk of sequences:
    its activations (about ``CHUNK_ACTIVATION_BYTES`` per buffer), the attention scores of the
    chunk and the causal mask (seq_len x seq_len).
    """
    hidden, seq_len, samples = model_config.hidden_size, config.seq_len, config.num_samples
    streams = (
        1 + 2 * (getattr(config, "target", "local") == "dense") + bool(getattr(config, "refine_epochs", 0))
    )
    widest = max(hidden, getattr(model_config, "intermediate_size", None) or 4 * hidden)
    chunk = max(1, CHUNK_ACTIVATION_BYTES // (FLOAT32 * widest * seq_len))
    heads = getattr(model_config, "num_attention_heads", 1)
    block = CHUNK_BUFFERS * chunk * seq_len * widest * FLOAT32 + (chunk * heads + 1) * seq_len**2 * FLOAT32
    return streams * samples * seq_len * hidden * FLOAT32 + samples * seq_len * 8 + block


def check_calibration_memory(model_config, config: LowRankConfig) -> None:
    """Refuse a calibration whose activations will not fit in the memory available now."""
    needed = calibration_memory(model_config, config)
    available = psutil.virtual_memory().available
    if needed > available:
        raise MemoryError(
            f"the calibration needs about {needed / 2**30:.1f} GiB of memory ({config.num_samples} samples x "
            f"{config.seq_len} tokens x {model_config.hidden_size} hidden states in float32, plus one block's "
            f"activations) and {available / 2**30:.1f} GiB are available; lower num_samples or seq_len "
            "(CLI: --num-samples, --seq-len)"
        )
