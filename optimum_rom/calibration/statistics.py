"""Streaming feature statistics of the linears in a block.

ROM needs, for every linear ``y = W x + b``, the mean and covariance of ``W x`` over the
calibration tokens. We never keep the activations: each chunk is folded into float64 sums.
Linears that read the same tensor (q/k/v, gate/up) share one input covariance, from which
``Cov(W x) = W Cov(x) W^T`` follows exactly; a linear that is alone and wider on its input
side (down_proj) is measured on its output instead, which is the cheaper side.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..linalg import left_singular_pairs, symmetric, top_eigenvectors, top_left_singular_vectors
from ..precision import exact
from .walker import BlockStep, StopForward


class Moments:
    """Mean and covariance of a stream of feature vectors, accumulated in float64.

    Each chunk is shifted by the first chunk's mean before its Gram matrix is formed, which
    keeps the float32 chunk products accurate when features have a large mean (LLM hidden
    states have a few huge channels).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> torch.Tensor:
        """Add a chunk of features; returns the chunk as shifted rows (float32).

        A chunk's sums are float32 (a chunk is thousands of rows, not millions) and are folded
        into the float64 totals: torch's float64-accumulating sum of float32 rows is a slow loop.
        """
        rows = features.detach().reshape(-1, self.dim)
        if self.shift is None:
            self.shift = rows.float().mean(0)
        centred = rows - self.shift  # float32 whatever the features' dtype: one pass, no copy before
        self.sum += centred.sum(0).double()
        _add_upper_gram(self.gram, centred)
        self.count += rows.shape[0]
        return centred

    @property
    def mean(self) -> torch.Tensor:
        return self.shift.double() + self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Mean-centred covariance (divided by the token count), symmetric to the bit.

        Built in place: at 4096 features each float64 temporary is 134 MB, and the chain of
        out-of-place steps held four at once, the peak of a 7B-shaped measuring walk.
        """
        offset = self.sum / self.count
        full = self.gram.triu()  # only the upper triangle is accumulated
        full += full.triu(1).T
        return full.div_(self.count).sub_(torch.outer(offset, offset))

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``E[x x^T]``, symmetric to the bit."""
        mean = self.mean
        return self.covariance().add_(torch.outer(mean, mean))


GRAM_PARTS = 4
GRAM_PART_MIN_WIDTH = 128


def _add_upper_gram(total: torch.Tensor, rows: torch.Tensor) -> None:
    """Add the upper block triangle of ``rows^T rows`` (float32 products) to the float64 ``total``.

    A Gram matrix is symmetric, but torch exposes no symmetric rank-k update (BLAS syrk): the
    features are cut into column bands and each band is multiplied with itself and the bands
    after it, about 5/8 of the full product's arithmetic with four bands, in matmuls still large
    enough to run at full speed. The blocks below the diagonal stay zero (see ``covariance``).
    """
    width = rows.shape[1]
    parts = max(1, min(GRAM_PARTS, width // GRAM_PART_MIN_WIDTH))
    edges = [width * i // parts for i in range(parts + 1)]
    for start, end in zip(edges, edges[1:], strict=False):
        total[start:end, start:] += (rows[:, start:end].T @ rows[:, start:]).double()


class CrossMoments(Moments):
    """Moments of ``x`` and its cross-covariance with a paired stream ``z``, both float64.

    ``x`` is what a linear sees in the compressed model and ``z`` what it sees, for the same
    token, in the dense model: error-correcting fits regress the dense outputs on ``x``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.paired_shift: torch.Tensor | None = None
        self.paired_sum = torch.zeros(dim, dtype=torch.float64)
        self.cross = torch.zeros(dim, dim, dtype=torch.float64)

    def update_pair(self, features: torch.Tensor, paired: torch.Tensor) -> None:
        rows = super().update(features)
        others = paired.detach().reshape(-1, self.dim).float()
        if self.paired_shift is None:
            self.paired_shift = others.mean(0)
        others = others - self.paired_shift
        self.paired_sum += others.sum(0).double()
        self.cross += (rows.T @ others).double()

    @property
    def paired_mean(self) -> torch.Tensor:
        return self.paired_shift.double() + self.paired_sum / self.count

    def cross_covariance(self) -> torch.Tensor:
        """``E[(x - mean x)(z - mean z)^T]``."""
        return self.cross / self.count - torch.outer(self.sum / self.count, self.paired_sum / self.count)


@dataclass
class LinearStatistics:
    """Statistics measured for one linear: of its input ``x``, of its bias-free output ``W x``, or
    (``"paired"``) of its input in the compressed model together with its input in the dense one.

    ``dtype``: what the bases and spectra of centred input-side statistics are computed in. The
    sums are float64 whatever it is, and so is the input Cholesky factor (an ill-conditioned input
    covariance needs it); with float32, the products with the weight and the eigendecompositions,
    most of the arithmetic, are float32 (see ``RomConfig.factorization_precision``). The rest stay
    float64, where float32 does not resolve the spectrum at the cut: an uncentred second moment
    carries the mean's square, which can dwarf the variances, and an output-side covariance is of
    a down projection's outputs, where LLMs make their massive activations.
    """

    site: Literal["input", "output", "paired"]
    moments: Moments
    dtype: torch.dtype = torch.float64
    _roots: dict[bool, torch.Tensor] = field(default_factory=dict, repr=False)

    def second_moment(self, center: bool) -> torch.Tensor:
        """Covariance (``center``) or uncentred second moment of what was measured (float64)."""
        return self.moments.covariance() if center else self.moments.second_moment()

    def _dtype(self, center: bool) -> torch.dtype:
        return self.dtype if center and self.site == "input" else torch.float64

    def input_root(self, center: bool) -> torch.Tensor:
        """``L`` (float32 or float64: see the class) with ``L L^T`` = the input's second moment;
        computed once for all linears sharing it.

        Any such ``L`` gives the same ``F F^T = W C W^T``: the Cholesky factor is an order of
        magnitude cheaper than the eigendecomposition, which remains for a singular covariance
        (fewer tokens than features, dead channels), where Cholesky fails.
        """
        if center not in self._roots:
            second = self.second_moment(center)
            lower, info = torch.linalg.cholesky_ex(second)
            if info.item() != 0:
                values, vectors = torch.linalg.eigh(second)
                lower = vectors * values.clamp(min=0).sqrt()
            self._roots[center] = lower.to(self._dtype(center))
        return self._roots[center]

    def principal_output_basis(
        self,
        weight: torch.Tensor,
        rank: int,
        center: bool,
        root: torch.Tensor | None = None,
        gradient: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Top-``rank`` eigenvectors (out x rank, float32 or float64: see the class) of the
        covariance of ``W x`` (of ``R^T W x`` with a metric's ``root`` ``R``).

        ``Cov(W x) = F F^T`` with ``F = W L`` and ``Cov(x) = L L^T``, so they are the top left
        singular vectors of the thin ``F``; an output-side measurement gives the covariance directly.
        With the loss gradient's covariance ``gradient`` (``G``) at the output, the ``rank``
        eigenvectors of largest ``lambda_i u_i^T G u_i`` instead: dropping the others costs the
        loss ``E[e^T G e] = sum lambda_i u_i^T G u_i`` over them (the error is a sum of uncorrelated
        components along the dropped eigenvectors), the least any choice among them can.
        """
        if gradient is not None:
            values, vectors = self.output_eigenpairs(weight, center)
            energy = ((gradient.to(vectors.dtype) @ vectors) * vectors).sum(0).double()
            kept = (values * energy).topk(rank).indices
            return vectors[:, kept]
        dtype = self._dtype(center)
        weight = weight.to(dtype)
        if self.site == "output":
            covariance = self.second_moment(center).to(dtype)
            if root is not None:
                root = root.to(dtype)
                covariance = root.T @ covariance @ root
            return top_eigenvectors(covariance, rank)
        if root is not None:
            weight = root.to(dtype).T @ weight
        return top_left_singular_vectors(weight, rank, right=self.input_root(center))

    def output_spectrum(self, weight: torch.Tensor, center: bool) -> torch.Tensor:
        """Eigenvalues (descending, float64) of the covariance of ``W x``.

        From input-side statistics the spectrum of ``W C W^T`` is read from the smaller Gram matrix
        of ``F = W L`` (``L L^T = C``): the same nonzero eigenvalues.
        """
        if self.site == "output":
            covariance = self.second_moment(center).to(self._dtype(center))
        else:
            product = weight.to(self._dtype(center)) @ self.input_root(center)
            tall = product.shape[0] > product.shape[1]
            covariance = product.T @ product if tall else product @ product.T
        return torch.linalg.eigvalsh(symmetric(covariance)).flip(0).clamp(min=0).double()

    def output_eigenpairs(self, weight: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The spectrum above (float64) with its eigenvectors (out x k, float32 or float64): the
        directions ROM keeps or drops."""
        if self.site == "output":
            covariance = self.second_moment(center).to(self._dtype(center))
            values, vectors = torch.linalg.eigh(covariance)
            return values.flip(0).clamp(min=0).double(), vectors.flip(-1)
        values, vectors = left_singular_pairs(weight.to(self._dtype(center)), right=self.input_root(center))
        return values.double(), vectors

    def output_mean(self, weight: torch.Tensor) -> torch.Tensor:
        """Mean of ``W x`` (float64)."""
        if self.site == "output":
            return self.moments.mean
        return weight.double() @ self.moments.mean


def collect_block_statistics(
    step: BlockStep,
    linears: dict[str, nn.Linear],
    paired: bool = False,
    outputs: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LinearStatistics]:
    """Statistics of every given linear, from one pass of ``step``'s block over its inputs.

    All linears are measured on the block as it is when the step begins, as the paper does
    (measuring each group after compressing the ones before it was tried: it is slower and on
    SmolLM2 no better with uniform allocation, 8% worse with the paper's trailing blocks).
    Linears sharing an input share one :class:`LinearStatistics`; each pass stops once the
    last measured linear has been seen. ``paired`` (needs the walker's reference stream) also
    runs the block on the dense model's hidden states and pairs every input with its dense twin.
    With ``outputs``, the passes run to the block's end and its outputs are written there: the
    forward a caller would otherwise run again (for refinement targets, or the next block's inputs).
    ``dtype``: what the statistics' bases and spectra are computed in (see :class:`LinearStatistics`).
    """
    groups = shared_input_groups(step, linears)
    stats: dict[str, LinearStatistics] = {}
    leaders = []
    for group in groups:
        leader = linears[group[0]]
        if paired:
            measured = LinearStatistics("paired", CrossMoments(leader.in_features), dtype)
        elif len(group) > 1 or leader.in_features <= leader.out_features:
            measured = LinearStatistics("input", Moments(leader.in_features), dtype)
        else:
            measured = LinearStatistics("output", Moments(leader.out_features), dtype)
        stats.update({name: measured for name in group})
        leaders.append((leader, measured))

    for start in range(0, step.inputs.shape[0], step.batch_size):
        chunk = slice(start, start + step.batch_size)
        receivers = [_measurer(measured) for _, measured in leaders]
        if paired:
            dense_inputs: list[torch.Tensor] = []
            _run_until_measured(
                step, step.reference_inputs[chunk], [dense_inputs.append] * len(leaders), leaders
            )
            receivers = [
                lambda x, m=measured, z=z: m.moments.update_pair(x, z)
                for (_, measured), z in zip(leaders, dense_inputs, strict=True)
            ]
        result = _run_until_measured(step, step.inputs[chunk], receivers, leaders, stop=outputs is None)
        if outputs is not None:
            outputs[chunk] = result
    return stats


def _measurer(measured: LinearStatistics):
    return measured.moments.update


def _run_until_measured(
    step: BlockStep, hidden: torch.Tensor, receivers: list, leaders: list, stop: bool = True
) -> torch.Tensor | None:
    """Run the block on ``hidden``, handing each leader's input (its output, for output-site
    statistics) to its receiver; ``stop`` once the last one has been handed over, or else return
    the block's output."""
    handles = []
    last = len(leaders) - 1 if stop else -1

    def make_hook(index: int, output_site: bool):
        def receive(value: torch.Tensor) -> None:
            with exact(value.device):  # the block's autocast would round the statistics' products
                receivers[index](value)
            if index == last:  # nothing after this is needed: skip the rest of the block
                raise StopForward

        if output_site:
            return lambda module, inputs, output: receive(
                output if module.bias is None else output - module.bias
            )
        return lambda module, inputs: receive(inputs[0])

    for index, (leader, measured) in enumerate(leaders):
        if measured.site == "output":
            handles.append(leader.register_forward_hook(make_hook(index, True)))
        else:
            handles.append(leader.register_forward_pre_hook(make_hook(index, False)))
    try:
        with torch.no_grad(), contextlib.suppress(StopForward):
            return step.call(hidden)
    finally:
        for handle in handles:
            handle.remove()


def shared_input_groups(step: BlockStep, linears: dict[str, nn.Linear]) -> list[list[str]]:
    """The linears grouped by the input tensor they receive, in the order the block calls them.

    Found on a one-sequence probe; q/k/v (and gate/up) read the very same tensor.
    """
    seen: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            seen[name] = inputs[0]  # holding the tensor keeps its memory from being reused by a later one

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            step.call(step.inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in linears if name not in seen]
    if missing:
        raise RuntimeError(
            f"{missing[0]} was not called by its block's forward pass; it cannot be calibrated"
        )
    groups: dict[tuple, list[str]] = {}
    for name, tensor in seen.items():  # insertion order = call order
        groups.setdefault((tensor.data_ptr(), tensor.shape, tensor.stride()), []).append(name)
    return list(groups.values())
