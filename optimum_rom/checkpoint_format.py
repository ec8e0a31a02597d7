"""The factorized checkpoint format, in one place: what a saved optimum-rom model is made of.

A checkpoint is an ordinary transformers directory whose ``config.json`` carries the pass's
config as ``quantization_config``, with ``modules`` = the rank of every factorized linear, and
whose safetensors files hold ``<linear>.down.weight`` (rank x in), ``<linear>.up.weight``
(out x rank) and, where there is one, ``<linear>.up.bias`` instead of the dense weight. The weight
files are tagged ``format = FORMAT_TAG``: stock transformers refuses to load a tag it does not
know, quoting it, so a checkpoint opened without the plugin fails with the fix in the message
instead of becoming a dense model with random linears.

Both writers (transformers' ``save_pretrained`` through our quantizer, and streaming's own
writer) and every reader (transformers' loader, the up-front file check) go through here.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from .configs import LowRankConfig
from .layers import FactorizedLinear
from .structure import set_module

FORMAT_TAG = (
    "optimum-rom factorized (low-rank) weights: run `pip install optimum-rom` and `import optimum_rom` "
    "before from_pretrained"
)
RANK_SUFFIX = ".down.weight"  # the factor whose first dimension is the rank


def weights_metadata() -> dict[str, str]:
    """The safetensors metadata of a factorized checkpoint's weight files."""
    return {"format": FORMAT_TAG}


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    """The rank of every factorized linear of ``model``, by module name."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def with_ranks(config: LowRankConfig, ranks: dict[str, int]) -> LowRankConfig:
    """A copy of ``config`` recording ``ranks`` as its ``modules``: what ``config.json`` holds."""
    recorded = copy.deepcopy(config)
    recorded.modules = dict(ranks)
    return recorded


def build_skeleton(model: nn.Module, config: LowRankConfig) -> None:
    """Swap every linear listed in ``config.modules`` for an empty FactorizedLinear of its rank
    (before the weights are read into it)."""
    for name, rank in config.modules.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the checkpoint's quantization_config lists {name!r}, which {type(model).__name__} does not have; "
                "config.json and the weights do not belong together"
            ) from None
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"{name!r} is a {type(dense).__name__}, expected nn.Linear to factorize")
        layer = FactorizedLinear(
            dense.in_features,
            dense.out_features,
            rank,
            bias=config.factorized_bias(dense.bias is not None),
            device=dense.weight.device,
            dtype=dense.weight.dtype,
        )
        set_module(model, name, layer)


def check_ranks(config_path: Path, listed: dict[str, int], shapes: dict[str, list[int]]) -> None:
    """The ranks ``config.json`` lists must be the factors the weights hold, linear by linear."""
    stored = {
        name.removesuffix(RANK_SUFFIX): shape[0]
        for name, shape in shapes.items()
        if name.endswith(RANK_SUFFIX)
    }
    for name in sorted(set(listed) | set(stored)):
        if listed.get(name) != stored.get(name):
            says, holds = (f"rank {r}" if r else "no factors" for r in (listed.get(name), stored.get(name)))
            raise ValueError(
                f"{config_path} and the weights disagree on {name}: quantization_config.modules says {says}, the "
                f"weights hold {holds}; restore the checkpoint's own config.json or compress the model again"
            )


def factor_owner(key: str) -> str | None:
    """The linear a factor's tensor name belongs to (``a.b.q_proj.down.weight`` -> ``a.b.q_proj``)."""
    if key.endswith((".down.weight", ".up.weight", ".up.bias")):
        return key.rsplit(".", 2)[0]
    return None
