"""Quantized weights for an exported ONNX model: 8- or 4-bit weight-only, or dynamic int8.

Weight-only (``int8`` / ``int4``, the recommended formats): every linear becomes onnxruntime's
``MatMulNBits`` (one float scale per block of ``block_size`` input features) and the embedding
table ``GatherBlockQuantized``. Activations stay float.

onnxruntime's ``MatMulNBitsQuantizer`` does the bulk: every MatMul by a constant weight (the
decoder linears, both factors of a factorized one, an untied lm_head). 8 bits: round to nearest,
symmetric, the kernel quantizing activations block by block (accuracy level 4); that keeps the
fp32 quality within a fraction of a percent. 4 bits: its HQQ algorithm (half-quadratic: a scale and
a float zero point per block fitted to the weights, no data needed), because round to nearest at 4
bits, or HQQ with its zero points rounded to integers, loses far more (on SmolLM2, whose weights come
from a Q4_1 GGUF, i.e. already 4-bit blocks of 32 with a float offset, HQQ at blocks of 32 recovers
them exactly and round to nearest loses 25% perplexity). onnxruntime's CPU kernel has no fast path for
float zero points (it dequantizes the whole weight on every call: an order of magnitude slower
than int8), so ``_split_float_zero_points`` rewrites them exactly into a form it runs fast.
What the quantizer cannot do is done here, by ``_WeightOnlyRewriter``:

- the embedding table at 8 bits (its Gather quantization is 4-bit only), which is also the default
  under 4-bit linears (``embedding_bits``): the table is a small model's most sensitive weight; in
  blocks that tile its rows (``table_block``);
- a tied lm_head, which reads the table through a ``Transpose`` the quantizer skips; the table is
  quantized once and read by both ``GatherBlockQuantized`` and the head's ``MatMulNBits`` (the
  quantizer would store it twice: 28M of SmolLM2's 134.5M parameters);
- ``Gemm`` with a bias (Qwen's q/k/v, a centered ROM linear's up factor), folded into
  ``MatMulNBits``' bias input (at 4 bits they are handed to HQQ as MatMul + Add instead).

``int8-dynamic``: optimum's ``ORTQuantizer`` in dynamic mode (int8 per-channel weights,
activations quantized per tensor at run time to uint8). That is onnxruntime's classic recipe; on
small LLMs the per-tensor activation scale is set by a few outlier features and perplexity
degrades badly (see the README's measurements), which is why it is not the default.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

WEIGHT_FORMATS = ("fp32", "int8", "int4", "int8-dynamic")
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
# MatMulNBits accuracy level 4: the kernel quantizes each block of activations to int8 and uses
# integer dot products (fast on VNNI / dot-product CPUs); the scales keep the error per block.
ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"
QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


def check_weight_options(bits: int, block_size: int, embedding_bits: int) -> None:
    """Bits MatMulNBits / GatherBlockQuantized store (4 or 8) and their block: a power of two >= 16."""
    for name, value in (("bits", bits), ("embedding_bits", embedding_bits)):
        if value not in BITS.values():
            raise ValueError(f"{name} must be 4 or 8, got {value}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (16, 32, 64, 128, ...), got {block_size}")


def quantize_blockwise(
    weight: np.ndarray, bits: int = 8, block_size: int = BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """``(packed, scales)`` of ``weight`` (out x in), symmetric ``bits``-bit per block of ``block_size`` inputs.

    ``packed`` is uint8 ``(out, blocks, block_size * bits / 8)`` holding ``q + 2**(bits-1)``
    (onnxruntime's default zero point), two 4-bit values per byte low nibble first; ``scales`` is
    ``(out, blocks)``. The input dimension is zero-padded to whole blocks.
    """
    rows, columns = weight.shape
    blocks = -(-columns // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :columns] = weight
    padded = padded.reshape(rows, blocks, block_size)
    largest = 2 ** (bits - 1) - 1
    scales = np.abs(padded).max(axis=-1) / largest
    scales[scales == 0] = 1.0
    quantized = np.clip(np.rint(padded / scales[..., None]), -largest, largest) + 2 ** (bits - 1)
    quantized = quantized.astype(np.uint8)
    if bits == 4:
        quantized = quantized[..., 0::2] | (quantized[..., 1::2] << 4)
    return quantized, scales.astype(np.float32)


def quantize_weights(
    model: onnx.ModelProto,
    bits: int = 8,
    block_size: int = BLOCK_SIZE,
    embedding_bits: int | None = None,
    progress: bool = True,
) -> onnx.ModelProto:
    """``bits``-bit weight-only ``model``: linears -> MatMulNBits, the embedding -> GatherBlockQuantized.

    ``embedding_bits`` (default ``bits``) is the embedding table's, and a tied lm_head's, which read it.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    embedding_bits = embedding_bits or bits
    check_weight_options(bits, block_size, embedding_bits)
    if bits == 4:
        _gemms_as_matmuls(model)  # HQQ quantizes MatMuls only; a factor with a bias is a Gemm
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            bits=bits,
            op_types_to_quantize=("MatMul",),
        )
    logger = logging.getLogger(QUANTIZER_LOGGER)
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    finally:
        logger.setLevel(level)
    quantized = quantizer.model.model
    _WeightOnlyRewriter(quantized, bits, embedding_bits, block_size).run(progress)
    _split_float_zero_points(quantized)  # last: its float MatMuls are not weights to quantize
    return quantized


def _gemms_as_matmuls(model: onnx.ModelProto) -> None:
    """Each plain Gemm by a constant weight and bias -> MatMul + Add, so the quantizer's algorithm
    (HQQ at 4 bits) covers it too: the up factor of a centered ROM linear, Qwen's q/k/v.
    ``_split_float_zero_points`` folds the Add back into MatMulNBits' bias."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        found = constant_weight(node, initializers, producers) if node.op_type == "Gemm" else None
        bias = node.input[2] if len(node.input) > 2 else ""
        if found is None:
            nodes.append(node)
            continue
        weight, stored_in_x_out = found
        rows = initializers[weight].dims[1 if stored_in_x_out else 0]
        if bias and not is_bias(initializers, bias, rows):
            nodes.append(node)
            continue
        if not stored_in_x_out:  # transB: out x in, MatMul wants in x out
            transposed = f"{weight}.in_x_out"
            if transposed not in initializers:
                initializers[transposed] = numpy_helper.from_array(
                    np.ascontiguousarray(numpy_helper.to_array(initializers[weight]).T), transposed
                )
                graph.initializer.append(initializers[transposed])
            weight = transposed
        scope = node.name.rsplit("/", 1)[0]  # node names are <module scope>/<op> (see inspection.py)
        product = f"{node.output[0]}/product" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{scope}/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{scope}/Add_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_dead_nodes(model)


def matmul_nbits(
    inputs: list[str], output: str, name: str, columns: int, rows: int, bits: int, block: int
) -> onnx.NodeProto:
    """A MatMulNBits node (``columns`` = K inputs, ``rows`` = N outputs) on the int8-activation kernels."""
    return helper.make_node(
        "MatMulNBits", inputs, [output], name=name, domain=MS_DOMAIN,
        K=columns, N=rows, bits=bits, block_size=block, accuracy_level=ACCURACY_LEVEL,
    )  # fmt: skip


def is_bias(initializers: dict[str, onnx.TensorProto], name: str, rows: int) -> bool:
    """Whether ``name`` is a constant float vector of ``rows`` outputs, which MatMulNBits can add."""
    bias = initializers.get(name)
    return bias is not None and bias.data_type == TensorProto.FLOAT and list(bias.dims) == [rows]


def _split_float_zero_points(model: onnx.ModelProto) -> None:
    """Each MatMulNBits with float zero points -> the same product on onnxruntime's fast kernels.

    With ``q`` the stored codes, ``z`` / ``s`` a block's zero point and scale, and ``m`` the default
    zero point ``2**(bits-1)``: ``x . (q - z) s = x . (q - m) s + sum_block(x) (m - z) s``. The first
    term is a MatMulNBits without zero points (int8 activations, accuracy level 4); the second is a
    float MatMul of the input's block sums (``x`` times a constant 0/1 matrix, shared by the linears
    reading the same input; any ``K``, ragged last block included) by the ``blocks x N`` offsets,
    stored in the bytes the float zero points took. A bias ``Add`` right after is folded into the
    MatMulNBits.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {output.name for output in graph.output}
    block_sums: dict[tuple[str, int, int], str] = {}
    folded: set[str] = set()  # outputs of bias Adds absorbed into a MatMulNBits
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in folded:
            continue
        zero_points = (
            initializers.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        )
        if zero_points is None or zero_points.data_type != TensorProto.FLOAT or len(node.input) > 4:
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        columns, rows, bits, block = (attributes[k] for k in ("K", "N", "bits", "block_size"))
        blocks = -(-columns // block)
        scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(rows, blocks)
        zeros = numpy_helper.to_array(zero_points).reshape(rows, blocks)
        offsets = f"{node.input[1]}_block_offsets"
        graph.initializer.append(numpy_helper.from_array(((2 ** (bits - 1) - zeros) * scales).T, offsets))
        source = node.input[0]
        key = (source, columns, block)
        if key not in block_sums:
            indicator = f"block_indicator_{columns}x{block}"
            if indicator not in initializers:
                ones = np.zeros((columns, blocks), np.float32)
                ones[np.arange(columns), np.arange(columns) // block] = 1.0
                initializers[indicator] = numpy_helper.from_array(ones, indicator)
                graph.initializer.append(initializers[indicator])
            block_sums[key] = f"{source}/block_sums_{block}"
            nodes.append(
                helper.make_node("MatMul", [source, indicator], [block_sums[key]], name=block_sums[key])
            )
        output, inputs = node.output[0], list(node.input[:3])
        users = consumers[output]
        if output not in graph_outputs and len(users) == 1 and users[0].op_type == "Add":
            bias = next(name for name in users[0].input if name != output)
            if is_bias(initializers, bias, rows):
                inputs += ["", "", bias]  # no zero points, no g_idx, the bias
                output = users[0].output[0]
                folded.add(output)
        nodes += [
            matmul_nbits(inputs, f"{output}/symmetric", node.name, columns, rows, bits, block),
            helper.make_node(
                "MatMul", [block_sums[key], offsets], [f"{output}/offsets"], name=f"{node.name}/offsets"
            ),
            helper.make_node(
                "Add", [f"{output}/symmetric", f"{output}/offsets"], [output], name=f"{node.name}/add_offsets"
            ),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_dead_nodes(model)


def constant_weight(
    node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> tuple[str, bool] | None:
    """For a MatMul / Gemm multiplying by a constant 2-D float matrix: ``(initializer, stored_in_x_out)``.

    The operand is either the initializer itself (in x out, as exporters store linear weights; out x in
    for a ``transB`` Gemm) or ``Transpose`` of one (a tied lm_head reading the embedding table).
    Attention products (both operands computed at run time) give ``None``.
    """

    def float_matrix(name: str) -> bool:
        init = initializers.get(name)
        return init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) == 2

    right = node.input[1]
    if node.op_type == "Gemm":
        attributes = {a.name: (a.f if a.type == onnx.AttributeProto.FLOAT else a.i) for a in node.attribute}
        plain = (
            attributes.get("transA", 0) == 0
            and attributes.get("alpha", 1.0) == attributes.get("beta", 1.0) == 1.0
        )
        return (right, not attributes.get("transB", 0)) if plain and float_matrix(right) else None
    if node.op_type != "MatMul":
        return None
    if float_matrix(right):
        return right, True
    producer = producers.get(right)
    if producer is not None and producer.op_type == "Transpose" and float_matrix(producer.input[0]):
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0]:
            return producer.input[0], False
    return None


def table_block(width: int, block_size: int) -> int:
    """An embedding table's block: GatherBlockQuantized needs whole blocks in a row, so the largest
    power of two <= ``block_size`` dividing ``width`` (SmolLM2's 576 at ``block_size`` 128: 64)."""
    block = block_size
    while width % block and block > 16:
        block //= 2
    return block


class _WeightOnlyRewriter:
    """What ``MatMulNBitsQuantizer`` leaves in float: the embedding table (shared with a tied head) and Gemms."""

    def __init__(self, model: onnx.ModelProto, bits: int, table_bits: int, block_size: int) -> None:
        self.model = model
        self.bits, self.table_bits, self.block_size = bits, table_bits, block_size
        self.tables = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producers = {out: node for node in self.graph.node for out in node.output}
        self.position = {node.output[0]: i for i, node in enumerate(self.graph.node) if node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.graph_outputs = {output.name for output in self.graph.output}
        self.packed: dict[tuple[str, bool], tuple[str, str, int, int]] = {}  # (source, transposed) -> packed
        self.replacements: dict[int, list[onnx.NodeProto]] = {}  # node position -> nodes replacing it

    def run(self, progress: bool) -> None:
        nodes = list(self.graph.node)
        candidates = [i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Gemm", "Gather")]
        for index in tqdm(
            candidates, desc=f"int{self.bits} weights (the rest)", unit="node", disable=not progress
        ):
            node = nodes[index]
            if node.op_type == "Gather":
                self.rewrite_gather(index, node)
            else:
                self.rewrite_linear(index, node)
        rewritten = [new for i, node in enumerate(nodes) for new in self.replacements.get(i, [node])]
        del self.graph.node[:]
        self.graph.node.extend(rewritten)
        _remove_dead_nodes(self.model)
        if not any(opset.domain == MS_DOMAIN for opset in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    def pack(self, source: str, transposed: bool) -> tuple[str, str, int, int, int, int]:
        """Quantize a weight once, however many nodes read it: ``(data, scales, out, in, bits, block)``
        (an embedding table, which a tied head reads too, at ``table_bits`` and ``table_block``)."""
        key = (source, transposed)
        if key not in self.packed:
            matrix = numpy_helper.to_array(self.initializers[source])
            weight = matrix.T if transposed else matrix
            table = source in self.tables
            bits = self.table_bits if table else self.bits
            block = table_block(weight.shape[1], self.block_size) if table else self.block_size
            data, scales = quantize_blockwise(weight, bits, block)
            base = f"{source}.T" if transposed else source
            self.graph.initializer.extend(
                [
                    numpy_helper.from_array(data, f"{base}.int{bits}"),
                    numpy_helper.from_array(scales, f"{base}.scales"),
                ]
            )
            self.packed[key] = (f"{base}.int{bits}", f"{base}.scales", *weight.shape, bits, block)
        return self.packed[key]

    def rewrite_linear(self, index: int, node: onnx.NodeProto) -> None:
        """MatMul / Gemm by a constant weight -> MatMulNBits, absorbing a bias (Gemm's, or a following Add)."""
        found = constant_weight(node, self.initializers, self.producers)
        if found is None:
            return
        data, scales, rows, columns, bits, block = self.pack(*found)
        inputs, output = [node.input[0], data, scales], node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        if bias and not is_bias(self.initializers, bias, rows):
            return  # a Gemm whose C is not a constant vector of outputs: leave it in float
        bias_add = None if bias else self.foldable_bias(node, rows)
        if bias_add is not None:
            bias = next(i for i in bias_add.input if i != output)
            self.replacements[self.position[bias_add.output[0]]] = []
            output = bias_add.output[0]
        if bias:
            inputs += ["", "", bias]  # no zero points, no g_idx
        scope, op_name = node.name.rsplit("/", 1) if "/" in node.name else ("", node.name or output)
        name = f"{scope}/{op_name.replace(node.op_type, 'MatMulNBits', 1)}"
        self.replacements[index] = [matmul_nbits(inputs, output, name, columns, rows, bits, block)]

    def foldable_bias(self, node: onnx.NodeProto, rows: int) -> onnx.NodeProto | None:
        """The ``Add`` of a constant bias right after ``node``, which MatMulNBits absorbs."""
        output = node.output[0]
        users = self.consumers.get(output, [])
        if output in self.graph_outputs or len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        bias = next((i for i in add.input if i != output), "")
        return add if is_bias(self.initializers, bias, rows) else None

    def rewrite_gather(self, index: int, node: onnx.NodeProto) -> None:
        """An embedding lookup in a float table -> GatherBlockQuantized on the quantized table."""
        table = self.initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or axis != 0:
            return
        if table.dims[1] % table_block(table.dims[1], self.block_size):
            return  # no power-of-two block fits a row: the table stays in float
        data, scales, rows, columns, bits, block = self.pack(node.input[0], transposed=False)
        scope = node.name or "/" + node.output[0]  # new nodes are named <gather name>/<op>: unique
        shape_3d, width = f"{scales}.shape_3d", f"{scales}.row_width"
        if shape_3d not in self.initializers:
            blocks = columns // block
            for name, value in ((shape_3d, [rows, blocks, 1]), (width, [columns])):
                self.initializers[name] = numpy_helper.from_array(np.array(value), name)
                self.graph.initializer.append(self.initializers[name])
        scales_3d, gathered, indices_shape, output_shape = (
            f"{scope}/{suffix}" for suffix in ("scales_3d", "gathered", "indices_shape", "output_shape")
        )
        self.replacements[index] = [
            helper.make_node("Reshape", [scales, shape_3d], [scales_3d], name=f"{scope}/Reshape_scales"),
            helper.make_node(
                "GatherBlockQuantized",
                [data, node.input[1], scales_3d],
                [gathered],
                name=f"{scope}/GatherBlockQuantized",
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=2,
                block_size=block,
                bits=bits,
            ),
            helper.make_node("Shape", [node.input[1]], [indices_shape], name=f"{scope}/Shape"),
            helper.make_node(
                "Concat", [indices_shape, width], [output_shape], name=f"{scope}/Concat", axis=0
            ),
            helper.make_node("Reshape", [gathered, output_shape], [node.output[0]], name=f"{scope}/Reshape"),
        ]


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (e.g. the Transpose of a now-quantized table) and unused initializers."""
    graph = model.graph
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def quantize_dynamic_with_ort_quantizer(onnx_dir: Path, save_dir: Path) -> None:
    """optimum's ``ORTQuantizer``, dynamic int8 with per-channel weights, into ``save_dir/model.onnx``.

    Only MatMuls with a constant weight are quantized (what onnxruntime's own ``quantize_dynamic``
    does by default with ``MatMulConstBOnly``, and what optimum does not pass on): quantizing both
    operands of the attention products of the stock graph at run time costs quality for no gain.
    """
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    graph = onnx.load(onnx_dir / "model.onnx", load_external_data=False).graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    activation_products = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and constant_weight(n, initializers, producers) is None
    ]
    config = AutoQuantizationConfig.avx512_vnni(
        is_static=False, per_channel=True, nodes_to_exclude=activation_products
    )
    ORTQuantizer.from_pretrained(onnx_dir).quantize(config, save_dir, file_suffix="")


__all__ = [
    "BITS",
    "WEIGHT_FORMATS",
    "check_weight_options",
    "constant_weight",
    "quantize_blockwise",
    "quantize_dynamic_with_ort_quantizer",
    "quantize_weights",
]
