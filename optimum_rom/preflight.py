"""What a run will need, checked against what the model and the machine allow, before any work.

A sequence longer than the model's context, calibration activations larger than the free
memory, or a healing stage that cannot hold its model, teacher and optimizer would otherwise
fail (or swap the machine to a halt) minutes or hours into the run.
"""

from __future__ import annotations

import psutil
from torch import nn

from .calibration.walker import CHUNK_ACTIVATION_BYTES
from .configs import HealingSpec, LowRankConfig
from .structure import count_parameters, decoder_linear_parameters, find_blocks

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


# Vocabulary-sized float32 buffers per healing token (at most; bfloat16 steps halve them): the
# student's and the teacher's logits, their rows at the target positions, the distillation loss's
# gradient and its scaled copy in the backward.
LOGIT_BUFFERS = 6
# Bytes a fully trained parameter adds: its gradient and Adam's two moments (float32).
FULL_TRAINING_BYTES = 12


def healing_memory(
    model: nn.Module, config: LowRankConfig, spec: HealingSpec, seq_len: int, resident: bool
) -> int:
    """Bytes the healing stage adds to what is in memory when the run starts (an estimate).

    The compressed model (unless ``resident``: compressed in place, it is smaller than the dense
    model already loaded), the dense teacher when distilling, the gradient and Adam's state of
    every trained parameter for full fine-tuning (LoRA's are a few percent: not counted), and a
    batch's vocabulary-sized logits.
    """
    total = count_parameters(model)
    if config.ratio_of == "model":
        kept = config.params_ratio * total
    else:
        kept = total - (1 - config.params_ratio) * decoder_linear_parameters(model)
    blocks = sum(p.numel() for p in find_blocks(model)[1].parameters()) * kept / total
    vocab = getattr(model.config, "vocab_size", 0) or 0
    return int(
        (0 if resident else FLOAT32 * kept)
        + (FLOAT32 * total if spec.distill else 0)
        + (FULL_TRAINING_BYTES * blocks if spec.trained == "full" else 0)
        + LOGIT_BUFFERS * spec.batch_size * seq_len * vocab * FLOAT32
    )


def check_healing_memory(
    model: nn.Module, config: LowRankConfig, spec: HealingSpec, seq_len: int, resident: bool
) -> None:
    """Refuse a healing stage that will not fit in the memory available now, before the compression
    it follows (which may take hours on a large model)."""
    needed = healing_memory(model, config, spec, seq_len, resident)
    available = psutil.virtual_memory().available
    if needed <= available:
        return
    parts, fixes = [], []
    if not resident:
        parts.append("the compressed model")
    if spec.distill:
        parts.append("the dense teacher")
    if spec.trained == "full":
        parts.append("gradients and Adam's state of every block parameter")
        fixes.append("heal_params='lora' (CLI --heal-params lora)")
    if spec.distill:
        fixes.append("heal_distill=False (CLI --no-heal-distill)")
    fixes.append("no healing (heal_minutes=0 and time_budget=0)")
    raise MemoryError(
        f"healing needs about {needed / 2**30:.1f} GiB ({', '.join([*parts, 'a batch of logits'])}) and "
        f"{available / 2**30:.1f} GiB are available; heal with {' or '.join(fixes)}"
    )
