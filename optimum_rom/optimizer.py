"""``LowRankOptimizer``: the Optimum-style entry point, ``from_pretrained(...)`` then ``compress(...)``."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer
from transformers import PreTrainedModel

from .calibration.data import CalibrationSource, describe_source, load_calibration
from .checkpoint import atomic_directory, check_output_dir
from .configs import LowRankConfig
from .integrations.transformers import attach_quantizer
from .model_sources import load_model
from .passes import pass_for
from .structure import count_parameters


@dataclass
class CompressionReport:
    """What a compression did, for logs, the CLI's JSON output and benchmarks."""

    method: str
    params_before: int
    params_after: int
    target_ratio: float
    factorized_modules: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


class LowRankOptimizer(OptimumQuantizer):
    """Compress a causal LM into factorized linears.

    Example::

        optimizer = LowRankOptimizer.from_pretrained("smollm2-135m-instruct")
        model = optimizer.compress(RomConfig(params_ratio=0.8), calibration="wiki.valid.txt", save_dir="out")
    """

    def __init__(self, model: PreTrainedModel, tokenizer=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.report: CompressionReport | None = None

    @classmethod
    def from_pretrained(
        cls, model_or_path: PreTrainedModel | str | Path, tokenizer=None, dtype: torch.dtype = torch.float32
    ) -> LowRankOptimizer:
        """From a model object, a local HF directory, a ``.gguf`` file, or a known alias."""
        model, loaded_tokenizer = load_model(model_or_path, dtype=dtype)
        return cls(model, tokenizer or loaded_tokenizer)

    def compress(
        self,
        config: LowRankConfig,
        calibration: CalibrationSource | None = None,
        save_dir: str | Path | None = None,
        *,
        text_field: str = "text",
        overwrite: bool = False,
        progress: bool = True,
    ) -> PreTrainedModel:
        """Compress the model in place with the pass ``config`` selects; save it if ``save_dir`` is given.

        Every check (output directory, calibration data, reachable size target) runs before
        the expensive work, and nothing is written unless the run completes.
        """
        if not isinstance(config, LowRankConfig):
            raise TypeError(
                f"config must be a RomConfig or another LowRankConfig, got {type(config).__name__}"
            )
        config = copy.deepcopy(config)
        compression_pass = pass_for(config)
        if save_dir is not None:
            check_output_dir(save_dir, overwrite)
            if self.tokenizer is None:
                raise ValueError(
                    "saving needs a tokenizer: pass tokenizer= to LowRankOptimizer.from_pretrained"
                )
        if not compression_pass.needs_calibration:
            calibration = None  # data-free pass (e.g. SVD): nothing to read
        elif calibration is None:
            raise ValueError(
                "calibration data is required: a text or jsonl file, a list of strings, or token ids"
            )
        elif self.tokenizer is None and not isinstance(calibration, torch.Tensor):
            raise ValueError(
                "text calibration needs a tokenizer: pass tokenizer= to LowRankOptimizer.from_pretrained"
            )
        input_ids = None
        if calibration is not None:
            input_ids = load_calibration(
                calibration, self.tokenizer, config.num_samples, config.seq_len, config.seed, text_field
            )
        plan = compression_pass.plan(self.model, config)

        started = time.perf_counter()
        params_before = count_parameters(self.model)
        compression_pass.run(self.model, config, input_ids, plan=plan, progress=progress)
        config.calibration = None if calibration is None else describe_source(calibration)
        attach_quantizer(self.model, config)
        self.report = CompressionReport(
            method=config.quant_method,
            params_before=params_before,
            params_after=count_parameters(self.model),
            target_ratio=config.params_ratio,
            factorized_modules=len(config.modules),
            seconds=time.perf_counter() - started,
        )
        if save_dir is not None:
            self.save(save_dir, overwrite=overwrite)
        return self.model

    def save(self, save_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the factorized checkpoint (safetensors + config + tokenizer) atomically."""
        with atomic_directory(save_dir, overwrite) as partial:
            self.model.save_pretrained(partial)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(partial)
        return Path(save_dir)

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs) -> PreTrainedModel:
        """optimum's ``OptimumQuantizer`` interface: same as :meth:`compress` with a ``save_dir``."""
        return self.compress(save_dir=save_dir, **kwargs)
