"""Reading an exported graph back: which linears it holds, with which weight shapes.

Works on the stock exporter's graphs and on ours, fp32 or quantized, because both name a node
``<module scope>/<op>`` (``/model/layers.0/mlp/up_proj/down/MatMul``).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .weights import constant_weight


def linear_weights(model: onnx.ModelProto | str | Path) -> dict[str, tuple[int, int]]:
    """Module name -> ``(in_features, out_features)`` of every node multiplying by a constant weight.

    A factorized ``q_proj`` shows up as ``...q_proj.down`` and ``...q_proj.up``; a dense one as ``...q_proj``.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    weights: dict[str, tuple[int, int]] = {}
    for node in graph.node:
        shape = None
        if node.op_type in ("MatMul", "Gemm"):
            found = constant_weight(node, initializers, producers)
            if found is not None:
                dims = list(initializers[found[0]].dims)
                shape = (dims[0], dims[1]) if found[1] else (dims[1], dims[0])
        elif node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            shape = (attributes["K"], attributes["N"])
        elif node.op_type == "MatMulInteger" and node.input[1] in initializers:
            dims = list(initializers[node.input[1]].dims)
            shape = (dims[0], dims[1])
        if shape is not None:
            weights[node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")] = shape
    return weights


def verify_factorized(model: onnx.ModelProto | str | Path, ranks: dict[str, int]) -> int:
    """Check that each factorized linear (name -> rank) is two thin MatMuls in the graph; return how many.

    Raises ``RuntimeError`` naming the first linears that were re-densified or lost.
    """
    weights = linear_weights(model)
    broken = []
    for name, rank in ranks.items():
        down, up = weights.get(f"{name}.down"), weights.get(f"{name}.up")
        if name in weights or down is None or up is None or down[1] != rank or up[0] != rank:
            broken.append(f"{name} (rank {rank}): down {down}, up {up}, dense {weights.get(name)}")
    if broken:
        raise RuntimeError(
            f"{len(broken)} factorized linears are not two rank-r MatMuls in the exported graph, e.g. "
            + "; ".join(broken[:3])
        )
    return len(ranks)


__all__ = ["linear_weights", "verify_factorized"]
