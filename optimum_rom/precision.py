"""What arithmetic runs in: float32, or bfloat16 under torch's autocast where the hardware has it.

Training steps and the calibration walks' block forwards both take a precision name (``"auto"``,
``"float32"``, ``"bfloat16"``); this module turns it into a dtype and an autocast context, so the
two agree on what ``"auto"`` means.
"""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a forward multiplies in (``None``: float32, no autocast).

    ``"auto"`` is bfloat16 where the device has native bfloat16 arithmetic, where its matmul is
    several times float32's (AVX512-BF16 or AMX CPUs; CUDA GPUs that support it); elsewhere
    bfloat16 is emulated, slower than float32, so ``"auto"`` keeps float32. (torch has no public
    query for the CPU's instructions; ``torch.cpu._is_*_supported`` are the ones its own kernels use.)
    """
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        native = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else None


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """torch's autocast to ``dtype`` on ``device``, or nothing for ``None`` (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def exact(device: torch.device) -> contextlib.AbstractContextManager:
    """Suspend an enclosing autocast: for sums computed inside a bfloat16 forward (the statistics'
    hooks) whose products must stay float32, as autocast would otherwise round every matmul."""
    return torch.autocast(device.type, enabled=False)


FACTORIZATION_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def factorization_dtype(precision: str) -> torch.dtype:
    """What a ``factorization_precision`` name computes the bases and spectra in (see
    ``LinearStatistics``); there is no "auto": float32 is faster everywhere."""
    return FACTORIZATION_DTYPES[precision]
