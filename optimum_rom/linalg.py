"""The eigen- and singular-vector computations the passes share, in the dtype they are handed
(float64, or float32 where the statistics say so: see ``LinearStatistics.dtype``).

Kept apart from the passes so that ROM, the sensitivity pass and Basis Selection derive their
bases the same way from the same statistics (see ``LinearStatistics``).
"""

from __future__ import annotations

import torch

# Below this share of the largest eigenvalue, a Gram matrix's eigenvalue is rounding: its absolute
# error is a few machine epsilons of the largest one, times a factor that grows with the width.
NEGLIGIBLE = {torch.float64: 1e-10, torch.float32: 1e-6}


def symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """``(M + M^T) / 2``: removes the rounding asymmetry of a Gram matrix before ``eigh``."""
    return (matrix + matrix.T) / 2


def top_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the ``rank`` largest eigenvalues of a symmetric matrix, largest first."""
    _, vectors = torch.linalg.eigh(symmetric(matrix))
    return vectors[:, -rank:].flip(-1)


def _gram_eigenpairs(
    matrix: torch.Tensor, right: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigenpairs, largest first, of the smaller Gram matrix of ``F = matrix @ right`` (or of
    ``matrix``), and whether F is tall: for a wide F, of ``F F^T`` (its eigenvectors are F's left
    singular vectors); for a tall one, of ``F^T F`` (its right singular vectors).

    For a tall ``matrix`` (an MLP's up projection) the Gram matrix is formed as
    ``right^T (matrix^T matrix) right`` and ``F`` itself, as large as the weight in float64, is never
    materialized: it was the largest temporary of a streamed run.
    """
    rows, columns = matrix.shape[0], (matrix if right is None else right).shape[1]
    if rows <= columns:
        product = matrix if right is None else matrix @ right
        values, vectors = torch.linalg.eigh(symmetric(product @ product.T))
    else:
        gram = matrix.T @ matrix if right is None else right.T @ (matrix.T @ matrix) @ right
        values, vectors = torch.linalg.eigh(gram)
    return values.flip(0), vectors.flip(-1), rows > columns


def top_left_singular_vectors(
    matrix: torch.Tensor, rank: int, right: torch.Tensor | None = None
) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``F = matrix @ right`` (or of ``matrix``), from the
    eigenpairs of F's smaller Gram matrix."""
    values, vectors, tall = _gram_eigenpairs(matrix, right)
    if not tall:
        return vectors[:, :rank]
    values, vectors = values[:rank], vectors[:, :rank]
    # rank-deficient: the SVD keeps the basis orthonormal
    if values[-1] <= NEGLIGIBLE[values.dtype] * values[0]:
        product = matrix if right is None else matrix @ right
        return torch.linalg.svd(product, full_matrices=False)[0][:, :rank]
    scaled = vectors / values.sqrt()
    return matrix @ (scaled if right is None else right @ scaled)


def left_singular_pairs(
    matrix: torch.Tensor, right: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All squared singular values (descending) of ``F = matrix @ right`` and their left singular
    vectors (one column each), from the eigenpairs of F's smaller Gram matrix.

    A column whose value is zero to rounding is zero too: no direction carries it.
    """
    values, vectors, tall = _gram_eigenpairs(matrix, right)
    values = values.clamp(min=0)
    if not tall:
        return values, vectors
    live = values > NEGLIGIBLE[values.dtype] * values[0]
    scaled = torch.where(live, vectors / values.sqrt().clamp(min=torch.finfo(values.dtype).tiny), 0.0)
    return values, matrix @ (scaled if right is None else right @ scaled)


def fisher_root(covariance: torch.Tensor, damping: float) -> torch.Tensor | None:
    """``R`` (lower triangular) with ``R R^T = (1 - d) G / mean(diag G) + d I``: the damped metric a
    Fisher-weighted factorization measures its error in. Normalized by its mean diagonal so that
    ``d`` means the same at every layer; ``None`` when ``G`` is zero (nothing to weight by)."""
    scale = covariance.diagonal().mean()
    if not scale > 0:
        return None
    identity = torch.eye(len(covariance), dtype=covariance.dtype)
    return torch.linalg.cholesky(symmetric((1 - damping) * covariance / scale + damping * identity))
