"""Lets transformers load optimum-rom checkpoints in any Python process, without ``import optimum_rom``.

``optimum_rom_autoload.pth`` (installed next to the package) imports this module when Python
starts. It only puts a finder at the front of ``sys.meta_path`` that waits for
``transformers.quantizers.auto``. When transformers imports that module, the finder steps aside
and registers stand-ins for optimum-rom's quantization methods there; the plugin itself is
imported only when a checkpoint that names one of them is loaded (``from_dict`` of the stand-in),
and the import replaces the stand-ins with the real classes. So ``lm_eval --model hf``, a TRL or
accelerate script, or ``transformers.pipeline`` load a factorized checkpoint like any other.

Cost: a process that never imports transformers pays one string comparison per import; one that
imports transformers but loads no factorized checkpoint, three dict insertions. Set
``OPTIMUM_ROM_NO_AUTOLOAD=1`` to turn it off.

Hand-rolled rather than wrapt's post-import hooks (the usual library for this) because that
would import wrapt into every Python process at start-up, which is the cost this avoids.
"""

from __future__ import annotations

import os
import sys

TRANSFORMERS_QUANTIZERS = "transformers.quantizers.auto"
QUANT_METHODS = ("rom", "svd", "basis_selection")


class PluginConfigStandIn:
    """Stands in for optimum-rom's config classes in transformers' registry until a checkpoint uses one."""

    _optimum_rom_stand_in = True

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

        import optimum_rom  # noqa: F401  (registers the real classes in place of the stand-ins)

        config_class = AUTO_QUANTIZATION_CONFIG_MAPPING[config_dict["quant_method"]]
        if config_class is cls:
            raise ImportError("optimum_rom was imported but did not register its quantization configs")
        return config_class.from_dict(config_dict, **kwargs)


class _WaitForTransformers:
    """A meta path finder that only acts on transformers' quantizer registry, once."""

    def find_spec(self, name: str, path=None, target=None):
        if name != TRANSFORMERS_QUANTIZERS:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_then_register(module) -> None:
                execute(module)
                for method in QUANT_METHODS:
                    module.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(method, PluginConfigStandIn)

            spec.loader.exec_module = execute_then_register
        return spec


def install() -> None:
    if not os.environ.get("OPTIMUM_ROM_NO_AUTOLOAD") and TRANSFORMERS_QUANTIZERS not in sys.modules:
        sys.meta_path.insert(0, _WaitForTransformers())


install()
