"""What truncating each linear costs the model: the damage curves adaptive allocation spends against.

Cutting a linear to rank ``r`` changes its outputs by the tail of its output spectrum: on the
calibration data the mean squared error is ``tail(r) = sum_{i >= r} lambda_i`` (the eigenvalues
of the output covariance ROM diagonalizes). How much that error costs depends on where the
layer sits. To second order the loss grows by the error weighted by the curvature, which the
empirical Fisher approximates by the squared gradient of the loss at the layer's output. With
one number per linear, the mean squared gradient per output element ``g2``, the expected loss
increase of rank ``r`` is ``g2 * tail(r)``.

Per direction (``scoring="direction"``), the gradient is not taken as isotropic: dropping the
``i``-th principal direction ``u_i`` costs ``lambda_i * w_i`` with ``w_i`` the mean of
``(g . u_i)^2``, the gradient's energy along that direction (``g2`` is the mean of the ``w_i``).
The budget then follows where the loss is sensitive inside a matrix, not only between matrices:
the allocation-level form of ZS-SVD's per-direction scores (it scores singular directions of the
weights; ROM drops principal directions of the outputs). ROM still keeps each matrix's top-``r``
by variance, so the curve sums ``lambda_i * w_i`` in that order, unless the factorization keeps
the directions of largest ``lambda_i * w_i`` (``ranked``, the scored metric): then the curve sums
them from the smallest.

The gradient weights are what matter: the spectrum alone (no gradient) allocates worse than
uniform ranks (docs/quality.md). Weighted, it keeps early and value/key projections dense, where errors
travel far.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..structure import LinearSite, find_blocks
from .data import CalibrationSet
from .gradients import OutputGradients
from .statistics import collect_block_statistics
from .walker import BlockStream, ReadOnlyBlocks, WeightSource, embed_inputs, walk_blocks

GRADIENT_SAMPLES = 32  # sequences for the gradient pass (its cost: one more forward + a backward each)


def measure_damage(
    model: nn.Module,
    data: CalibrationSet,
    sites: list[LinearSite],
    center: bool = True,
    progress: bool = True,
    weights: WeightSource | None = None,
    scratch: Path | None = None,
    scoring: str = "matrix",
    covariances: Path | None = None,
    ranked: bool = False,
    precision: str = "float32",
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """``damage[name][r]``: estimated loss increase of keeping rank ``r`` of that linear (float64).

    One forward walk over the dense model, block by block, measures the output spectra (every
    token) and keeps the inputs of a few sequences; a backward walk then finds the loss gradients
    at the linears' outputs on those (see optimum_rom.calibration.gradients). With ``weights`` the
    model is on the meta device and each block is read when it is needed: one block in memory.
    ``scratch`` is where the kept inputs (and, per direction, the output bases) go (default: the
    system's temporary directory). ``scoring``: ``"matrix"`` or ``"direction"`` (see the module).
    With ``covariances`` (a directory), the gradient covariances at every linear's output are kept
    there too, for a Fisher-metric or scored factorization (``RomConfig(metric=...)``). ``ranked``:
    each linear keeps its directions of largest damage, not of largest variance. ``precision``:
    of the walks' block forwards and the backward through them (see optimum_rom.precision).
    ``dtype``: what the spectra are computed in (see ``LinearStatistics``).
    """
    by_block: dict[int, list[str]] = {}
    for site in sites:
        by_block.setdefault(site.block, []).append(site.name)
    per_direction = scoring == "direction"
    spill_bytes = 0
    if per_direction:
        spill_bytes += sum(s.out_features * min(s.out_features, s.in_features) * 4 for s in sites)
    if covariances is not None:
        spill_bytes += sum(s.out_features**2 * 4 for s in sites)
    gradients = OutputGradients(
        model, data.rows(slice(GRADIENT_SAMPLES)), scratch, spill_bytes, covariances=covariances
    )
    spectra = _forward_walk(
        model, data, by_block, gradients, center, progress, weights, precision, dtype, per_direction
    )
    squared = gradients.backward(by_block, weights, progress, precision)
    damage = {}
    for site in sites:
        dropped = spectra[site.name] * squared[site.name]  # what dropping each direction costs
        if ranked:
            dropped = dropped.sort(descending=True).values
        damage[site.name] = torch.cat([dropped.flip(0).cumsum(0).flip(0), dropped.new_zeros(1)])
    return damage


def _forward_walk(
    model: nn.Module,
    data: CalibrationSet,
    by_block: dict[int, list[str]],
    gradients: OutputGradients,
    center: bool,
    progress: bool,
    weights: WeightSource | None,
    precision: str,
    dtype: torch.dtype,
    per_direction: bool,
) -> dict[str, torch.Tensor]:
    """The measuring walk: every linear's output spectrum, and what the backward walk needs kept.

    A function of its own so that the last block's statistics, its hidden states and the stream's
    go when it returns: on a 7B-shaped model they are ~1 GB, held through the backward walk otherwise.
    """
    blocks_name, blocks = find_blocks(model)
    stream = None
    if weights is not None:
        stream = BlockStream(
            ReadOnlyBlocks(weights, blocks_name), 0, embed_inputs(model, data.input_ids, weights)
        )
    spectra = {}
    with torch.no_grad():
        for step in walk_blocks(
            model, data.input_ids, desc="sensitivity", progress=progress, stream=stream, precision=precision
        ):
            linears = {name: model.get_submodule(name) for name in by_block.get(step.index, [])}
            step.outputs = torch.empty_like(step.inputs)  # the block stays dense: one forward serves both
            statistics = collect_block_statistics(step, linears, outputs=step.outputs, dtype=dtype)
            for name, linear in linears.items():
                if per_direction:
                    spectra[name], basis = statistics[name].output_eigenpairs(linear.weight, center)
                    gradients.keep_basis(step.index, name, basis)
                    del basis
                else:
                    spectra[name] = statistics[name].output_spectrum(linear.weight, center)
            gradients.record(step, last=step.index == len(blocks) - 1)
    return spectra
