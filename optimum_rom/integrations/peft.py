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
    """PEFT LoRA layer whose base layer is a :class:`FactorizedLinear`."""

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
        weight = base_layer.down.weight
        return weight.device, weight.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append each adapter to the factors as extra rank (exact)."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name].weight
            lora_b = self.lora_B[name].weight * self.scaling[name]
            down = torch.cat([base.down.weight.data, lora_a.to(base.down.weight.dtype)], dim=0)
            up = torch.cat([base.up.weight.data, lora_b.to(base.up.weight.dtype)], dim=1)
            if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            _set_factors(base, down, up)
            if self.lora_bias.get(name, False):
                base.up.bias.data += self.lora_B[name].bias * self.scaling[name]
            self._merged_ranks.append(lora_a.shape[0])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            added = self._merged_ranks.pop()
            keep = base.rank - added
            _set_factors(base, base.down.weight.data[:keep].clone(), base.up.weight.data[:, :keep].clone())
            if self.lora_bias.get(name, False):
                base.up.bias.data -= self.lora_B[name].bias * self.scaling[name]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _set_factors(layer: FactorizedLinear, down: torch.Tensor, up: torch.Tensor) -> None:
    layer.down.weight = nn.Parameter(down, requires_grad=layer.down.weight.requires_grad)
    layer.up.weight = nn.Parameter(up, requires_grad=layer.up.weight.requires_grad)
    layer.down.out_features = layer.up.in_features = down.shape[0]


def install_peft_dispatch() -> None:
    """Make every LoRA model register :class:`LoraFactorizedLinear` for factorized targets (idempotent)."""
    original = LoraModel._create_new_module
    if getattr(original, "_optimum_rom", False):
        return

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, FactorizedLinear) and FactorizedLinear not in (lora_config._custom_modules or {}):
            lora_config._register_custom_module({FactorizedLinear: LoraFactorizedLinear})
        return original(lora_config, adapter_name, target, **kwargs)

    create_new_module._optimum_rom = True
    LoraModel._create_new_module = staticmethod(create_new_module)
