"""PEFT LoRA on factorized models, addressed by the dense model's names.

``get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))`` reaches our
``FactorizedLinear`` modules under their dense names. PEFT has a documented (experimental)
hook for such layer types, ``LoraConfig._register_custom_module``; ``import optimum_rom``
arranges that every LoRA model registers :class:`LoraFactorizedLinear` for them, so users need
no extra call and saved adapters reload the same way.

Semantics are plain LoRA: the adapter adds ``s * B A x`` to the layer. Merging is exact and
keeps the layer factorized: the adapter becomes ``lora_r`` extra rank,
``down = [down; A]`` and ``up = [up, s * B]``. To adapt at a fixed size instead, target the
factors themselves (``target_modules=["q_proj.down", "q_proj.up"]``), which are plain linears.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..layers import FactorizedLinear


class LoraFactorizedLinear(LoraLinear):
    """PEFT LoRA layer whose base layer is a :class:`FactorizedLinear` or another registered low-rank layer.

    Which layer types are low-rank is set by :func:`install_peft_dispatch`.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        if config.use_dora or config.fan_in_fan_out:
            raise ValueError(
                "LoRA on optimum-rom factorized layers supports plain LoRA (no DoRA, no fan_in_fan_out)"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._merged_ranks: list[int] = []

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        weight = next(base_layer.parameters())
        return weight.device, weight.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append each adapter to the base layer as extra rank (exact)."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name].weight
            lora_b = self.lora_B[name].weight * self.scaling[name]
            if safe_merge and not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            base.append_rank(lora_a.detach(), lora_b.detach())
            if self.lora_bias.get(name, False):
                base.up.bias.data += self.lora_B[name].bias * self.scaling[name]
            self._merged_ranks.append(lora_a.shape[0])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.drop_last_rank(self._merged_ranks.pop())
            if self.lora_bias.get(name, False):
                base.up.bias.data -= self.lora_B[name].bias * self.scaling[name]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


_LOW_RANK_LAYERS: list[type[nn.Module]] = []


def install_peft_dispatch(low_rank_layers: tuple[type[nn.Module], ...] = (FactorizedLinear,)) -> None:
    """Make every LoRA model register :class:`LoraFactorizedLinear` for targets of the ``low_rank_layers``
    types (idempotent; ``import optimum_rom`` installs it for its layers).

    A low-rank layer has ``in_features`` / ``out_features`` and grows or shrinks its rank exactly with
    ``append_rank(down_rows, up_columns)`` / ``drop_last_rank(n)``.
    """
    _LOW_RANK_LAYERS.extend(t for t in low_rank_layers if t not in _LOW_RANK_LAYERS)
    original = LoraModel._create_new_module
    if getattr(original, "_optimum_rom", False):
        return

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_type = type(base)
        if layer_type in _LOW_RANK_LAYERS and layer_type not in (lora_config._custom_modules or {}):
            lora_config._register_custom_module({layer_type: LoraFactorizedLinear})
        return original(lora_config, adapter_name, target, **kwargs)

    create_new_module._optimum_rom = True
    LoraModel._create_new_module = staticmethod(create_new_module)


def merge_adapters(peft_model) -> nn.Module:
    """``merge_and_unload``, minus the ``peft_config`` PEFT leaves behind (a later stage would see two adapters)."""
    model = peft_model.merge_and_unload()
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
