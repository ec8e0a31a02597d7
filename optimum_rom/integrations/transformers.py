"""Loading and saving factorized checkpoints through transformers' own ``from_pretrained``.

``import optimum_rom`` registers our configs and quantizer in transformers' quantizer registry
(with the plugin installed, ``optimum_rom_autoload`` does that import when a checkpoint needs it),
so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the factorized skeleton from
``config.json``'s ``quantization_config.modules`` before the weights are read. Factors the config
does not list, or listed factors the weights lack, refuse to load instead of being random-initialized.

Why the safetensors format tag: stock transformers skips an unknown ``quantization_config``
with a warning and silently random-initialises every weight it cannot find, so a factorized
checkpoint opened without the plugin would become a dense model with random linears. Our
weight files are therefore tagged ``format = FORMAT_TAG``; stock transformers
refuses that with an error quoting the tag, which says what to install. With the plugin
imported, transformers' safetensors reader is taught to treat the tag as ``"pt"``. This is
the one piece of transformers we wrap, and the wrapper changes nothing for any other file.
"""

from __future__ import annotations

from typing import Any

import transformers.modeling_utils as modeling_utils
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from ..checkpoint_format import (
    FORMAT_TAG,
    build_skeleton,
    factor_owner,
    factorized_ranks,
    weights_metadata,
    with_ranks,
)
from ..configs import LowRankConfig
from ..layers import FactorizedLinear
from ..structure import set_module


class LowRankHfQuantizer(HfQuantizer):
    """transformers' hooks for a checkpoint made by any optimum-rom pass."""

    requires_calibration = False
    requires_parameters_quantization = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError(
                f"{type(self.quantization_config).__name__} cannot be applied while loading a dense model: "
                "compression needs calibration data. Use optimum_rom.LowRankOptimizer.from_pretrained(model)"
                ".compress(config, calibration=...) or `optimum-cli rom compress`."
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        build_skeleton(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        return model

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        # transformers would random-initialize these and only warn: a factorized checkpoint that lacks
        # a factor is corrupted or partial, and must not load.
        factorized = tuple(f"{name}." for name in self.quantization_config.modules)
        lost = [
            key
            for key in missing_keys
            if key.startswith(factorized) or f"{prefix}.{key}".startswith(factorized)
        ]
        if lost:
            raise ValueError(
                f"the checkpoint is incomplete or corrupted: {len(lost)} factorized tensors are missing "
                f"(e.g. {lost[0]}); compress the model again"
            )
        return missing_keys

    def update_unexpected_keys(self, model: nn.Module, unexpected_keys: list[str]) -> list[str]:
        # Factors of a linear that config.json does not list would be dropped and the dense linear
        # random-initialized: the config and the weights do not belong together, which must not load.
        modules = dict(model.named_modules())
        dense = sorted(
            {
                name
                for key in unexpected_keys
                for name in [factor_owner(key)]
                if name is not None and isinstance(modules.get(name), nn.Linear)
            }
        )
        if dense:
            raise ValueError(
                f"the weights hold {len(dense)} linears as low-rank factors that config.json's "
                f"quantization_config.modules does not list (e.g. {dense[0]}): the config and the weights do "
                "not belong together; restore the checkpoint's own config.json or compress the model again"
            )
        return unexpected_keys

    def get_state_dict_and_metadata(self, model: nn.Module, safe_serialization: bool = False):
        # Record the ranks the model has now (a merged LoRA adapter may have grown them); transformers
        # writes config.json from model.config right after this call.
        self.quantization_config = with_ranks(self.quantization_config, factorized_ranks(model))
        model.config.quantization_config = self.quantization_config
        return None, _TaggedMetadata()

    def _dequantize(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, FactorizedLinear):
                set_module(model, name, module.to_linear())
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def attach_quantizer(model: nn.Module, config: LowRankConfig) -> None:
    """Make a model compressed in this process look exactly like one loaded from a checkpoint."""
    config = with_ranks(config, factorized_ranks(model))
    model.config.quantization_config = config
    model.hf_quantizer = LowRankHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method


class _TaggedMetadata(dict):
    """Safetensors metadata that keeps our format tag: transformers writes ``format = "pt"`` after
    asking the quantizer for metadata, and this dict declines that one overwrite."""

    def __init__(self) -> None:
        super().__init__(weights_metadata())

    def __setitem__(self, key: str, value: str) -> None:
        if key != "format":
            super().__setitem__(key, value)


class _SafeOpenAcceptingRom:
    """``safetensors.safe_open`` that reports our format tag as ``"pt"`` to transformers' loader."""

    _original = modeling_utils.safe_open

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._handle = self._original(*args, **kwargs)

    def __enter__(self) -> _SafeOpenAcceptingRom:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def metadata(self) -> dict[str, str] | None:
        metadata = self._handle.metadata()
        if metadata and metadata.get("format") == FORMAT_TAG:
            metadata = {**metadata, "format": "pt"}
        return metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def register_with_transformers(configs: dict[str, type[LowRankConfig]]) -> None:
    """Register our configs and quantizer under each ``quant_method`` (idempotent).

    The stand-ins that ``optimum_rom_autoload`` registers when the plugin is installed are replaced;
    another library's registration under the same name is kept.
    """
    for method, config_class in configs.items():
        if getattr(AUTO_QUANTIZATION_CONFIG_MAPPING.get(method), "_optimum_rom_stand_in", True):
            AUTO_QUANTIZATION_CONFIG_MAPPING[method] = config_class
        AUTO_QUANTIZER_MAPPING.setdefault(method, LowRankHfQuantizer)
    if modeling_utils.safe_open is not _SafeOpenAcceptingRom:
        modeling_utils.safe_open = _SafeOpenAcceptingRom


def is_factorized(model: nn.Module) -> bool:
    return any(isinstance(m, FactorizedLinear) for m in model.modules())


__all__ = ["LowRankHfQuantizer", "attach_quantizer", "is_factorized", "register_with_transformers"]
