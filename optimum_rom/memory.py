"""Keeping a streamed compression's memory at what it uses, not what glibc's heap keeps.

Freed tensors go back to the C heap, and glibc hands heap memory back to the OS only from its
top: blocks and their activations of many sizes, freed in any order, leave a heap as large as
the most ever in use plus fragmentation. A streamed run's peak memory is the point of streaming,
so large allocations are made to bypass the heap there (glibc only; elsewhere these are no-ops),
and the caches of bfloat16 matmul primitives are bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
LARGE_ALLOCATION_BYTES = 2**20
# glibc's ceiling for its dynamic threshold (64-bit), above a walk's chunk of activations
# (calibration.walker.CHUNK_ACTIVATION_BYTES)
HEAP_ALLOCATION_BYTES = 32 * 2**20
# Width from which the measuring walks map their large allocations too (see maps_plan_walks).
WIDE_MODEL_HIDDEN_SIZE = 2048
# Entries of each matmul primitive cache: a training step through a factorized block uses ~40 shapes.
MATMUL_CACHE_CAPACITY = "64"
# oneDNN's own primitive cache, and ideep's (torch's layer over oneDNN), which keeps primitives of
# its own: bounding one of them leaves the other growing.
MATMUL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS.

    glibc raises its mmap threshold after large blocks are freed, so later same-sized tensors
    come from the heap, which it does not shrink by itself: without this, a streamed run's
    memory grows by one block per block although every block is freed.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bound_matmul_cache() -> None:
    """Bound the caches of bfloat16 matmul primitives, unless the environment already sets them.

    torch runs bfloat16 matmuls on a CPU with oneDNN, through ideep; each keeps a primitive per
    matmul shape in a cache of its own (1024 entries by default), each primitive holding work memory
    of its own, and with adaptive ranks nearly every linear has shapes of its own: unbounded, the
    caches grow block after block, and with only oneDNN's bounded, ideep's still grows. Bounded,
    they still hold a training step's shapes. Each cache reads its variable once, when it makes its
    first primitive, for the whole process: so this runs before any of a compression's work (the
    calibration's generation, the walks), and a process that multiplied in bfloat16 before keeps
    the defaults.
    """
    for variable in MATMUL_CACHE_VARIABLES:
        os.environ.setdefault(variable, MATMUL_CACHE_CAPACITY)


@contextlib.contextmanager
def flat_peak_memory(trains: bool = False) -> Iterator[None]:
    """Serve large allocations with their own memory maps, returned when freed.

    Mapped memory starts on fresh pages the kernel must zero, a price paid per allocation. A run
    that only walks (no training steps) maps what is larger than a walk's chunk of activations
    (hidden-state streams, large weights): a block's forward over one chunk after another then
    reuses the same heap memory. A run that ``trains`` (block refinement) maps everything from
    1 MiB: autograd's activations of many sizes left on the heap raise its peak. glibc maps only
    what its heap's free chunks cannot serve: the walks that measure a plan, on the heap, leave it
    in pieces that then serve the compression walk's large allocations, whose pages stay resident
    until the next trim, so a wide model maps from the plan's first walk (:func:`maps_plan_walks`).
    Fixing the threshold also stops glibc from raising it after large frees; glibc has no call that
    restores its dynamic threshold, so on exit it is set to where the dynamic one ends up in a long
    run, its 32 MiB ceiling.
    """
    _set_mmap_threshold(LARGE_ALLOCATION_BYTES if trains else HEAP_ALLOCATION_BYTES)
    try:
        yield
    finally:
        _set_mmap_threshold(HEAP_ALLOCATION_BYTES)


def maps_plan_walks(hidden_size: int) -> bool:
    """Whether a streamed run maps its large allocations in the walks that measure its plan too.

    A walk's large allocations are chunks of about the same bytes whatever the model's width, and a
    block's arithmetic per byte grows with the width: a narrow model pays for the fresh pages a
    large share of its time for a small saving, a wide one a small share for a large saving (see
    docs/streaming.md, "Peak memory", for both measured).
    """
    return hidden_size >= WIDE_MODEL_HIDDEN_SIZE


def _set_mmap_threshold(size: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size)


def peak_resident_mib() -> float:
    """This process's peak resident memory since it started or since :func:`reset_peak_resident`.

    ``VmHWM`` (Linux), not ``ru_maxrss``, which also counts the parent's memory copied at fork.
    """
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def reset_peak_resident() -> None:
    """Start :func:`peak_resident_mib` afresh at today's resident memory, so one phase's peak is its own."""
    Path("/proc/self/clear_refs").write_text("5")
