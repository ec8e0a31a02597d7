"""``LowRankOptimizer``: the Optimum-style entry point, ``from_pretrained(...)`` then ``compress(...)``."""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer
from transformers import PreTrainedModel

from .calibration.data import CalibrationSource, describe_source, load_calibration
from .checkpoint import atomic_directory, check_output_dir, default_work_dir
from .configs import LowRankConfig
from .integrations.transformers import attach_quantizer
from .model_sources import load_model
from .passes import PassData, pass_for
from .structure import count_parameters
from .task_data import TaskFormat, TaskSource, describe_task_source, load_task_source, training_examples


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
        # or, for one application:
        model = optimizer.compress(BasisSelectionConfig(params_ratio=0.8), train_dataset="gsm8k.jsonl", save_dir="out")
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
        train_dataset: TaskSource | None = None,
        task: str | TaskFormat = "gsm8k",
        text_field: str = "text",
        overwrite: bool = False,
        work_dir: str | Path | None = None,
        progress: bool = True,
    ) -> PreTrainedModel:
        """Compress the model in place with the pass ``config`` selects; save it if ``save_dir`` is given.

        ROM calibrates on ``calibration`` text (``text_field`` names jsonl fields); Basis Selection
        trains on ``train_dataset``, a jsonl of prompt/answer records formatted by ``task`` (a preset
        name or a TaskFormat) or a list of PromptAnswer. A training pass keeps its progress in
        ``work_dir`` (default: a hidden directory next to ``save_dir``), so rerunning an interrupted
        job continues from its last completed round; the directory is removed once the model is saved.

        Every check (output directory, data, reachable size target) runs before the expensive
        work, and nothing is written to ``save_dir`` unless the run completes.
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
        if compression_pass.data is PassData.TASK:
            data = self._training_examples(config, train_dataset, task, calibration)
            source = describe_task_source(train_dataset, task)
        else:
            data = self._calibration_ids(config, calibration, train_dataset, text_field)
            source = describe_source(calibration)
        plan = compression_pass.plan(self.model, config)
        if compression_pass.resumable and work_dir is None and save_dir is not None:
            work_dir = default_work_dir(save_dir)
        run_options = {"work_dir": work_dir} if compression_pass.resumable else {}

        started = time.perf_counter()
        params_before = count_parameters(self.model)
        compression_pass.run(self.model, config, data, plan=plan, progress=progress, **run_options)
        config.calibration = source
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
        if run_options.get("work_dir") is not None:
            shutil.rmtree(run_options["work_dir"], ignore_errors=True)
        return self.model

    def _calibration_ids(
        self,
        config: LowRankConfig,
        calibration: CalibrationSource | None,
        train_dataset: TaskSource | None,
        text_field: str,
    ) -> torch.Tensor:
        name = type(config).__name__
        if train_dataset is not None:
            raise ValueError(
                f"{name} calibrates on text, not on prompt/answer pairs: pass calibration= instead of "
                "train_dataset= (a jsonl works too: calibration='data.jsonl', text_field='question,answer')"
            )
        if calibration is None:
            raise ValueError(
                "calibration data is required: a text or jsonl file, a list of strings, or token ids"
            )
        if self.tokenizer is None and not isinstance(calibration, torch.Tensor):
            raise ValueError(
                "text calibration needs a tokenizer: pass tokenizer= to LowRankOptimizer.from_pretrained"
            )
        return load_calibration(
            calibration, self.tokenizer, config.num_samples, config.seq_len, config.seed, text_field
        )

    def _training_examples(
        self,
        config: LowRankConfig,
        train_dataset: TaskSource | None,
        task: str | TaskFormat,
        calibration: CalibrationSource | None,
    ) -> list[dict[str, torch.Tensor]]:
        name = type(config).__name__
        if train_dataset is None:
            hint = " instead of calibration=" if calibration is not None else ""
            raise ValueError(
                f"{name} trains on the target application's data: pass train_dataset={hint} (a jsonl of "
                "prompt/answer records with task='gsm8k' / 'code' / a TaskFormat, or a list of PromptAnswer)"
            )
        if calibration is not None:
            raise ValueError(f"{name} takes train_dataset=, not calibration=; pass only train_dataset")
        if self.tokenizer is None:
            raise ValueError(
                f"{name} tokenizes its training data: pass tokenizer= to LowRankOptimizer.from_pretrained"
            )
        pairs = load_task_source(train_dataset, task)
        return training_examples(self.tokenizer, pairs, config.num_samples, config.seq_len, config.seed)

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
