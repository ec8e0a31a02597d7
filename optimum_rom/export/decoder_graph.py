"""An ONNX graph of a transformers decoder built from its modules, with onnxruntime's fused kernels.

Why not only the stock exporter: ``optimum-cli export onnx`` traces the model into ~100 small
nodes per block (rotary maths, mask building, KV repetition, shape arithmetic). On a small
model that per-node overhead costs as much as the weights themselves, so a factorized model
barely decodes faster than the dense one. Here every block is a handful of nodes:
``SimplifiedLayerNormalization``, the linears, one ``GroupQueryAttention`` (rotary embedding,
KV cache and grouped heads inside one kernel) and the MLP. Factorized linears stay two thin
``MatMul`` s (``down`` then ``up``); nothing is re-densified.

The inputs and outputs are the stock exporter's (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.<i>.key|value`` -> ``logits``, ``present.<i>.key|value``),
so ``optimum.onnxruntime.ORTModelForCausalLM`` loads the result unchanged, left-padded batches included
(``position_ids`` is accepted for that interface; the rotary positions come from the cache, see
``attention_inputs``).
Node names follow the stock exporter's scopes (``/model/layers.0/self_attn/q_proj/down/MatMul``),
which is what :mod:`.inspection` reads back.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tqdm.auto import tqdm

from ..layers import FactorizedLinear

# Architectures whose blocks are exactly: RMSNorm -> q/k/v/o attention with rotary embedding
# -> RMSNorm -> gated MLP (act(gate) * up -> down). Checked against the PyTorch logits on export.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh", "GELUActivation": "gelu"}
# Gemma scales the embeddings by sqrt(hidden_size) before the first block.
EMBEDDING_SCALES = {"gemma": lambda config: config.hidden_size**0.5}
OPSET = 17
MS_DOMAIN = "com.microsoft"


class UnsupportedArchitectureError(ValueError):
    """The fused graph does not cover this model; the stock optimum exporter still does."""


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitectureError` naming what the fused graph cannot express."""
    config = model.config
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES} (use graph='optimum')"
        )
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type == "dynamic":
        raise UnsupportedArchitectureError("dynamic rotary scaling depends on the sequence length")
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        if getattr(attention, "sliding_window", getattr(config, "sliding_window", None)) is not None:
            raise UnsupportedArchitectureError(f"block {index} uses sliding-window attention")
        activation = type(layer.mlp.act_fn).__name__
        if activation not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"block {index} uses the activation {activation}")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _check_linear(getattr(attention, name), f"block {index} self_attn.{name}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            _check_linear(getattr(layer.mlp, name), f"block {index} mlp.{name}")


def _check_linear(module: nn.Module, where: str) -> None:
    if not isinstance(module, (nn.Linear, FactorizedLinear)):
        raise UnsupportedArchitectureError(
            f"{where} is a {type(module).__name__}; merge adapters (merge_and_unload) before exporting"
        )


def build_decoder_graph(model: nn.Module, progress: bool = True, gemm_bias: bool = True) -> onnx.ModelProto:
    """The fused ONNX graph (fp32) of a supported causal LM; see :func:`check_supported`.

    ``gemm_bias=False`` writes linears with a bias as ``MatMul`` + ``Add`` instead of one ``Gemm``
    (for quantizers that only know MatMul, such as optimum's dynamic int8).
    """
    check_supported(model)
    builder = _GraphBuilder(model, gemm_bias)
    with torch.no_grad():
        return builder.build(progress)


def _scope(module_name: str) -> str:
    """The stock exporter's node scope of a module: ``model.layers.0.mlp`` -> ``/model/layers.0/mlp``."""
    return "/" + module_name.replace(".", "/").replace("/layers/", "/layers.")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


class _GraphBuilder:
    def __init__(self, model: nn.Module, gemm_bias: bool) -> None:
        self.model = model
        self.gemm_bias = gemm_bias
        self.config = model.config
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.name_counts: Counter[str] = Counter()
        self.value_types: dict[str, int] = {}
        self.constant_names: set[str] = set()
        attention = model.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads

    # -- graph primitives -------------------------------------------------------------------
    def constant(self, name: str, value: np.ndarray) -> str:
        """An initializer (a name is created once; later calls with the same name reuse it)."""
        if name not in self.constant_names:
            self.constant_names.add(name)
            self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        scope: str,
        outputs: list[str] | None = None,
        domain: str = "",
        dtype: int = TensorProto.FLOAT,
        **attrs,
    ):
        """Add ``op`` named ``<scope>/<op>`` (the stock exporter's convention); return its output name(s).

        ``dtype`` (of the first output) goes into the graph's value_info: ONNX shape inference cannot
        see through onnxruntime's fused ops, and quantization tools need the element types.
        """
        name = f"{scope}/{op}"
        repeat = self.name_counts[name]
        self.name_counts[name] += 1
        name = f"{name}_{repeat}" if repeat else name  # the same op twice in one scope: MatMul, MatMul_1
        outputs = outputs or [f"{name}_output_0"]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        self.value_types[outputs[0]] = dtype
        return outputs[0] if len(outputs) == 1 else outputs

    # -- model pieces -----------------------------------------------------------------------
    def linear(self, x: str, module: nn.Module, name: str) -> str:
        """``module(x)``: one MatMul for a dense linear, two thin ones (down, up) for a factorized one."""
        if isinstance(module, FactorizedLinear):
            z = self.matmul(x, module.down, f"{name}.down")
            return self.matmul(z, module.up, f"{name}.up")
        return self.matmul(x, module, name)

    def matmul(self, x: str, linear: nn.Linear, name: str) -> str:
        """``x @ W^T (+ b)`` on the 2-D hidden states: ``MatMul``, or ``Gemm`` when there is a bias (one
        kernel instead of MatMul + Add). The weight is stored in x out, as the stock exporter stores it."""
        weight = self.constant(f"{name}.weight_t", _numpy(linear.weight).T)
        if linear.bias is None:
            return self.node("MatMul", [x, weight], _scope(name))
        return self.node(
            "Gemm", [x, weight, self.constant(f"{name}.bias", _numpy(linear.bias))], _scope(name)
        )

    def rms_norm(self, x: str, module: nn.Module, name: str) -> str:
        # The effective scale, read off the module itself: for an input of ones (rms 1) an RMSNorm
        # returns gamma / sqrt(1 + eps). This covers Llama's w and Gemma's (1 + w) alike.
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        ones = torch.ones(1, module.weight.shape[0], dtype=module.weight.dtype)
        gamma = _numpy(module(ones)[0]) * np.sqrt(1.0 + eps)
        weight = self.constant(f"{name}.weight", gamma.astype(np.float32))
        return self.node("SimplifiedLayerNormalization", [x, weight], _scope(name), axis=-1, epsilon=eps)

    def rotary_caches(self) -> tuple[str, str]:
        """cos/sin tables for every position, taken from the model's own rotary module (any rope scaling)."""
        positions = torch.arange(self.config.max_position_embeddings)[None]
        cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        half = self.head_dim // 2
        return (
            self.constant("model.rotary_emb.cos_cache", _numpy(cos[0, :, :half])),
            self.constant("model.rotary_emb.sin_cache", _numpy(sin[0, :, :half])),
        )

    def attention_inputs(self) -> tuple[str, str, str, str]:
        """``seqlens_k``, ``total_sequence_length``, the additive padding mask and the rotary positions
        for GroupQueryAttention.

        Every position up to the mask's length counts as present (``seqlens_k = total - 1``); padding,
        left or right, is masked by ``attention_bias`` instead, as the stock graph masks it. The rotary
        positions are the tokens' places in the cache (``total - length ... total - 1``), not the
        ``position_ids`` input: GroupQueryAttention rotates a prompt's keys at 0, 1, ... whatever it is
        given, so a left-padded row's later tokens must count the padding too to stay consistent with
        them (rotary attention depends only on distances, which the padding does not change).
        """
        scope, int64, int32 = "/model/attention_inputs", TensorProto.INT64, TensorProto.INT32
        mask_shape = self.node("Shape", ["attention_mask"], scope, dtype=int64)
        index_1 = self.constant("const.index_1", np.array(1))
        total = self.node("Gather", [mask_shape, index_1], scope, dtype=int64, axis=0)
        total_i32 = self.node("Cast", [total], scope, dtype=int32, to=int32)
        one_i32 = self.constant("const.one_i32", np.array(1, np.int32))
        last = self.node("Sub", [total_i32, one_i32], scope, dtype=int32)
        seqlens_k = self.node("Expand", [last, self.batch], scope, dtype=int32)

        mask = self.node("Cast", ["attention_mask"], scope, to=TensorProto.FLOAT)
        masked = self.node("Sub", [mask, self.constant("const.one_f32", np.array(1, np.float32))], scope)
        float_max = self.constant("const.float_max", np.array(np.finfo(np.float32).max, np.float32))
        bias = self.node("Mul", [masked, float_max], scope)  # 0 where attended, -max where padded
        bias = self.node("Unsqueeze", [bias, self.constant("const.axes_1_2", np.array([1, 2]))], scope)
        total_1d = self.node(
            "Unsqueeze", [total, self.constant("const.axes_0", np.array([0]))], scope, dtype=int64
        )
        one = self.constant("const.one_1d", np.array([1]))
        bias_shape = self.node("Concat", [self.batch, one, self.length, total_1d], scope, dtype=int64, axis=0)
        attention_bias = self.node("Expand", [bias, bias_shape], scope)

        length = self.node("Gather", [self.ids_shape, index_1], scope, dtype=int64)
        start = self.node("Sub", [total, length], scope, dtype=int64)
        steps = self.node(
            "Range", [start, total, self.constant("const.one_i64", np.array(1))], scope, dtype=int64
        )
        row = self.node(
            "Unsqueeze", [steps, self.constant("const.axes_0", np.array([0]))], scope, dtype=int64
        )
        positions = self.node("Expand", [row, self.ids_shape], scope, dtype=int64)
        return seqlens_k, total_i32, attention_bias, positions

    def token_shapes(self) -> None:
        """Batch size and sequence length (1-D int64) of ``input_ids``: the hidden states are kept 2-D
        (tokens x features, so linears with a bias are single Gemms) and reshaped to 3-D for attention."""
        scope, int64 = "/model/token_shapes", TensorProto.INT64
        self.ids_shape = shape = self.node("Shape", ["input_ids"], scope, dtype=int64)
        self.batch = self.node(
            "Gather", [shape, self.constant("const.indices_0", np.array([0]))], scope, dtype=int64, axis=0
        )
        self.length = self.node(
            "Gather", [shape, self.constant("const.indices_1", np.array([1]))], scope, dtype=int64, axis=0
        )
        minus_one = self.constant("const.minus_one_1d", np.array([-1]))
        self.shape_3d = self.node("Concat", [self.batch, self.length, minus_one], scope, dtype=int64, axis=0)

    def to_3d(self, x: str, scope: str) -> str:
        return self.node("Reshape", [x, self.shape_3d], scope)

    def to_2d(self, x: str, width: int, scope: str) -> str:
        return self.node(
            "Reshape", [x, self.constant(f"const.shape_tokens_by_{width}", np.array([-1, width]))], scope
        )

    def mlp_activation(self, gate: str, module: nn.Module, scope: str) -> str:
        kind = ACTIVATIONS[type(module).__name__]
        if kind == "silu":
            return self.node("Mul", [gate, self.node("Sigmoid", [gate], scope)], scope)
        if kind == "gelu_tanh":
            return self.node("FastGelu", [gate], scope, domain=MS_DOMAIN)
        return self.node("Gelu", [gate], scope, domain=MS_DOMAIN)

    def build(self, progress: bool) -> onnx.ModelProto:
        config, decoder = self.config, self.model.model
        cos_cache, sin_cache = self.rotary_caches()
        self.token_shapes()
        seqlens_k, total_length, attention_bias, positions = self.attention_inputs()

        embeddings = self.constant("model.embed_tokens.weight", _numpy(decoder.embed_tokens.weight))
        hidden = self.node("Gather", [embeddings, "input_ids"], "/model/embed_tokens")
        scale = EMBEDDING_SCALES.get(config.model_type)
        if scale is not None:
            factor = self.constant("const.embed_scale", np.array(scale(config), np.float32))
            hidden = self.node("Mul", [hidden, factor], "/model/embed_tokens")
        hidden = self.to_2d(hidden, config.hidden_size, "/model/embed_tokens")

        layers = tqdm(decoder.layers, desc="ONNX graph", unit="block", disable=not progress)
        for index, layer in enumerate(layers):
            prefix = f"model.layers.{index}"
            scope = f"/model/layers.{index}"
            attention = layer.self_attn
            x = self.rms_norm(hidden, layer.input_layernorm, f"{prefix}.input_layernorm")
            q, k, v = (
                self.to_3d(
                    self.linear(x, getattr(attention, n), f"{prefix}.self_attn.{n}"), f"{scope}/self_attn"
                )
                for n in ("q_proj", "k_proj", "v_proj")
            )
            past = [f"past_key_values.{index}.key", f"past_key_values.{index}.value"]
            attended = self.node(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    *past,
                    seqlens_k,
                    total_length,
                    cos_cache,
                    sin_cache,
                    positions,
                    attention_bias,
                ],
                f"{scope}/self_attn",
                outputs=[f"{scope}/self_attn/attended", f"present.{index}.key", f"present.{index}.value"],
                domain=MS_DOMAIN,
                num_heads=self.num_heads,
                kv_num_heads=self.num_kv_heads,
                scale=float(attention.scaling),
                do_rotary=1,
                rotary_interleaved=0,
            )[0]
            attended = self.to_2d(attended, self.num_heads * self.head_dim, f"{scope}/self_attn")
            attended = self.linear(attended, attention.o_proj, f"{prefix}.self_attn.o_proj")
            hidden = self.node("Add", [hidden, attended], f"{scope}/residual_attention")

            x = self.rms_norm(hidden, layer.post_attention_layernorm, f"{prefix}.post_attention_layernorm")
            mlp = layer.mlp
            gate = self.linear(x, mlp.gate_proj, f"{prefix}.mlp.gate_proj")
            activated = self.mlp_activation(gate, mlp.act_fn, f"{scope}/mlp/act_fn")
            up = self.linear(x, mlp.up_proj, f"{prefix}.mlp.up_proj")
            product = self.node("Mul", [activated, up], f"{scope}/mlp")
            down = self.linear(product, mlp.down_proj, f"{prefix}.mlp.down_proj")
            hidden = self.node("Add", [hidden, down], f"{scope}/residual_mlp")

        hidden = self.rms_norm(hidden, decoder.norm, "model.norm")
        if self.model.lm_head.weight is decoder.embed_tokens.weight:  # tied: store the table once
            head = self.node("Transpose", [embeddings], "/lm_head", perm=[1, 0])
        else:
            head = self.constant("lm_head.weight_t", _numpy(self.model.lm_head.weight).T)
        logits = self.node("MatMul", [hidden, head], "/lm_head")
        self.node("Reshape", [logits, self.shape_3d], "/lm_head", outputs=["logits"])
        return self._model()

    def _model(self) -> onnx.ModelProto:
        config = self.config
        kv_shape = ["batch_size", self.num_kv_heads, "past_sequence_length", self.head_dim]
        present_shape = ["batch_size", self.num_kv_heads, "total_sequence_length", self.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
            ),
            helper.make_tensor_value_info(
                "position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            ),
        ]
        outputs = [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", config.vocab_size]
            )
        ]
        for index in range(config.num_hidden_layers):
            for kind in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_key_values.{index}.{kind}", TensorProto.FLOAT, kv_shape
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(f"present.{index}.{kind}", TensorProto.FLOAT, present_shape)
                )
        declared = {value.name for value in inputs + outputs}
        value_info = [
            helper.make_tensor_value_info(name, dtype, None)
            for name, dtype in self.value_types.items()
            if name not in declared
        ]
        graph = helper.make_graph(
            self.nodes, "optimum_rom_decoder", inputs, outputs, self.initializers, value_info=value_info
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="optimum-rom",
        )
        model.ir_version = 9
        return model


__all__ = ["SUPPORTED_MODEL_TYPES", "UnsupportedArchitectureError", "build_decoder_graph", "check_supported"]
