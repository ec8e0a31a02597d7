"""``LowRankOptimizer``: the Optimum-style entry point, ``from_pretrained(...)`` then ``compress(...)``."""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .allocation import RankPlan, UnreachableTargetError, kept_ratios, model_ratio
from .calibration.data import (
    BUNDLED_TEXT,
    CalibrationSet,
    CalibrationSource,
    ChatCalibration,
    as_chat_calibration,
    describe_source,
    load_calibration,
)
from .chat import Answerer, files_identity, weights_identity
from .checkpoint import (
    WorkDir,
    atomic_directory,
    check_output_dir,
    check_output_space,
    default_work_dir,
    rerun_can_continue,
    stored_bytes,
)
from .checkpoint_format import factorized_ranks
from .configs import HealingSpec, LowRankConfig
from .healing import AnswerLoss, HealingReport, WindowLoss, heal
from .integrations.transformers import attach_quantizer
from .memory import bound_matmul_cache, maps_plan_walks
from .model_card import write_model_card
from .model_sources import load_causal_lm, load_model, resolve_model_path, source_name
from .passes import CompressionPass, PassData, pass_for
from .preflight import check_calibration_memory, check_context_length, check_healing_memory
from .streaming import LazyCheckpoint, compress_streaming, plan_fingerprint, streamed_memory
from .structure import (
    check_compressible,
    check_finite_weights,
    check_materialized,
    count_parameters,
    decoder_linear_parameters,
    meta_model,
)
from .task_data import (
    TaskFormat,
    TaskSource,
    describe_task_source,
    load_task_source,
    split_pairs,
    training_examples,
)

# Healing draws its own windows from the calibration source: more text than calibration needs
# (15 minutes on this class of CPU sees roughly 100k tokens of a 135M model).
HEAL_SAMPLES = 1024
HEAL_SEQ_LEN = 256


@dataclass
class _Job:
    """One ``compress`` call, as its stages (prepare, data, plan, apply, heal, save) share it."""

    config: LowRankConfig
    method: CompressionPass
    save_dir: str | Path | None
    overwrite: bool
    streamed: bool
    progress: bool
    work_dir: Path | None
    maps_plan_walks: bool = False  # see memory.maps_plan_walks
    data: Any = None
    heal_data: CalibrationSet | None = None
    lazy: LazyCheckpoint | None = None
    scratch: Path | None = None  # an in-memory run's measurement spill (a streamed run's is work_dir)
    started: float = field(default_factory=time.perf_counter)  # what a time budget is measured from


@dataclass
class CompressionReport:
    """What a compression did, for logs, the CLI's JSON output and benchmarks."""

    method: str
    params_before: int
    params_after: int
    linear_params_before: int  # the decoder blocks' linears only (what papers count)
    linear_params_after: int
    target_ratio: float
    ratio_of: str  # what target_ratio is a fraction of: "model" or "linears"
    factorized_modules: int
    seconds: float  # planning (measuring walks) and compression; calibration data and healing excluded
    streamed: bool
    healing: dict | None = None

    @property
    def ratio(self) -> float:
        """Of the whole model (embeddings included, tied weights once)."""
        return self.params_after / self.params_before

    @property
    def linear_ratio(self) -> float:
        """Of the decoder linears only, as papers count."""
        return self.linear_params_after / self.linear_params_before

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "linear_ratio": self.linear_ratio}


class LowRankOptimizer(OptimumQuantizer):
    """Compress a causal LM into factorized linears.

    Example::

        optimizer = LowRankOptimizer.from_pretrained("smollm2-135m-instruct")
        model = optimizer.compress(RomConfig(params_ratio=0.8), calibration="wiki.valid.txt", save_dir="out")

    Opened from a directory, the model is not loaded until something needs it: ``compress``
    with a ``save_dir`` then streams it block by block (memory: one block plus the calibration
    activations, whatever the depth) and returns the saved checkpoint, loaded from disk.
    Accessing ``optimizer.model`` first loads it whole and compresses in memory instead.

    For one application, Basis Selection trains on prompt/answer pairs::

        model = optimizer.compress(BasisSelectionConfig(params_ratio=0.8), train_dataset="gsm8k.jsonl", save_dir="out")
    """

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        tokenizer=None,
        source: Path | None = None,
        dtype: torch.dtype = torch.float32,
        source_name: str | None = None,
    ) -> None:
        if model is None and source is None:
            raise ValueError("LowRankOptimizer needs a model or a source directory")
        self._model = model
        # the model in memory (or loaded later) is the source's weights as on disk (answer-cache identity)
        self._holds_source = source is not None
        self.tokenizer = tokenizer
        self.source = source
        self.dtype = dtype
        self.source_name = source_name
        self.report: CompressionReport | None = None

    @classmethod
    def from_pretrained(
        cls, model_or_path: PreTrainedModel | str | Path, tokenizer=None, dtype: torch.dtype = torch.float32
    ) -> LowRankOptimizer:
        """From a model object, a local HF directory, a ``.gguf`` file, or a known alias."""
        if isinstance(model_or_path, PreTrainedModel):
            return cls(
                model_or_path, tokenizer, source_name=getattr(model_or_path, "name_or_path", None) or None
            )
        directory, gguf_file = resolve_model_path(model_or_path)
        name = source_name(model_or_path)
        if gguf_file is not None:
            model, loaded_tokenizer = load_model(model_or_path, dtype=dtype)
            return cls(model, tokenizer or loaded_tokenizer, source=directory / gguf_file, source_name=name)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(directory)
        return cls(None, tokenizer, source=directory, dtype=dtype, source_name=name)

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = load_causal_lm(self.source, dtype=self.dtype)
        return self._model

    @model.setter
    def model(self, model: PreTrainedModel) -> None:
        self._model = model
        self._holds_source = False

    def compress(
        self,
        config: LowRankConfig,
        calibration: CalibrationSource | None = None,
        save_dir: str | Path | None = None,
        *,
        train_dataset: TaskSource | None = None,
        task: str | TaskFormat = "gsm8k",
        text_field: str = "text",
        chat: bool = False,
        holdout: int = 0,
        overwrite: bool = False,
        work_dir: str | Path | None = None,
        progress: bool = True,
    ) -> PreTrainedModel:
        """Compress the model with the pass ``config`` selects; save it if ``save_dir`` is given.

        ROM calibrates on ``calibration``: plain text (``text_field`` names jsonl fields), chat data
        (a jsonl of conversations, detected from its records or forced with ``chat=True``, or a
        :class:`ChatCalibration`), or ``"self"``: the dense model's own answers to a bundled prompt set,
        mixed with plain text, which is also the default for models with a chat template (the answers
        are generated once per model and cached). Basis Selection trains on ``train_dataset``, a jsonl
        of prompt/answer records formatted by ``task`` (a preset name or a TaskFormat) or a list of
        PromptAnswer; ``holdout`` leaves out the records ``split_pairs(pairs, holdout, seed=config.seed)``
        holds out, which ``EvaluationOptions(holdout=...)`` then scores. A training pass keeps its progress in
        ``work_dir`` (default: a hidden directory next to ``save_dir``), so rerunning an interrupted
        job continues from its last completed round; the directory is removed once the model is saved.

        Every check (output directory, data, reachable size target) runs before the expensive
        work, and nothing is written to ``save_dir`` unless the run completes.
        """
        if not isinstance(config, LowRankConfig):
            raise TypeError(
                f"config must be a RomConfig or another LowRankConfig, got {type(config).__name__}"
            )
        bound_matmul_cache()  # before the first bfloat16 matmul: the data's generation, the walks
        job = self._prepare(copy.deepcopy(config), save_dir, overwrite, work_dir, progress)
        self._load_data(job, calibration, train_dataset, task, text_field, chat, holdout)
        try:
            return self._compress(job)
        except BaseException as error:  # progress is kept only for a rerun that can get past the error
            if job.work_dir is not None and not rerun_can_continue(error):
                shutil.rmtree(job.work_dir, ignore_errors=True)
            raise
        finally:
            if job.scratch is not None:
                shutil.rmtree(job.scratch, ignore_errors=True)

    def _compress(self, job: _Job) -> PreTrainedModel:
        """Plan, apply, heal, save: the stages that may leave progress in the work directory."""
        save_dir, overwrite = job.save_dir, job.overwrite
        started = time.perf_counter()
        with streamed_memory(job.config) if job.maps_plan_walks else contextlib.nullcontext():
            model, plan = self._plan(job)
        spec = job.config.healing()
        teacher = None
        if spec is not None and spec.distill and not job.streamed:
            teacher = copy.deepcopy(model)  # the dense model, before it is compressed in place
        before = (count_parameters(model), decoder_linear_parameters(model))
        self._apply(job, model, plan)
        self._holds_source = False  # the model is the compressed one now, in memory or reloaded
        seconds = time.perf_counter() - started
        healing = self._heal(job, spec, teacher)
        self.report = CompressionReport(
            method=job.config.quant_method,
            params_before=before[0],
            params_after=count_parameters(self._model),
            linear_params_before=before[1],
            linear_params_after=decoder_linear_parameters(self._model),
            target_ratio=job.config.params_ratio,
            ratio_of=job.config.ratio_of,
            factorized_modules=len(factorized_ranks(self._model)),
            seconds=seconds,
            streamed=job.streamed,
            healing=healing.to_dict() if healing else None,
        )
        if save_dir is not None and (not job.streamed or healing):
            self.save(save_dir, overwrite=overwrite or job.streamed)
        elif save_dir is not None:
            self.write_model_card(save_dir)
        if job.work_dir is not None:
            shutil.rmtree(job.work_dir, ignore_errors=True)
        return self._model

    def _prepare(
        self, config: LowRankConfig, save_dir: str | Path | None, overwrite: bool, work_dir, progress: bool
    ) -> _Job:
        """The checks that need no data: the output, the tokenizer, the context length, the memory."""
        method = pass_for(config)
        if save_dir is not None:
            check_output_dir(save_dir, overwrite, inputs=self._input_paths())
            if self.tokenizer is None:
                raise ValueError(
                    "saving needs a tokenizer: pass tokenizer= to LowRankOptimizer.from_pretrained"
                )
        model_config = (
            self._model.config if self._model is not None else AutoConfig.from_pretrained(self.source)
        )
        if method.data is not PassData.NONE:
            check_context_length(model_config, config.seq_len)
        if method.data is PassData.CALIBRATION:
            check_calibration_memory(model_config, config)
        spec = config.healing()
        if spec is not None:
            resident = self._model is not None
            model = self._model if resident else meta_model(model_config)
            check_healing_memory(model, config, spec, HEAL_SEQ_LEN, resident)
        streamed = save_dir is not None and self._model is None and method.can_stream(config)
        if method.resumable and work_dir is None and save_dir is not None:
            work_dir = default_work_dir(save_dir)
        config.source_model = self.source_name
        return _Job(
            config, method, save_dir, overwrite, streamed, progress, work_dir if method.resumable else None,
            maps_plan_walks=streamed and maps_plan_walks(getattr(model_config, "hidden_size", 0)),
        )  # fmt: skip

    def _load_data(
        self, job: _Job, calibration, train_dataset, task, text_field: str, chat: bool, holdout: int
    ) -> None:
        """What the pass consumes (and the healing stage after it), loaded and checked before any work."""
        config = job.config
        if job.method.data is PassData.TASK:
            job.data = self._training_examples(config, train_dataset, task, calibration, holdout)
            config.calibration = describe_task_source(train_dataset, task)
        elif job.method.data is PassData.CALIBRATION:
            source = self._calibration_source(config, calibration, train_dataset, chat)
            config.calibration = describe_source(source)
            job.data, job.heal_data = self._calibration_data(
                config, source, text_field, job.streamed, job.progress
            )
        else:
            config.calibration = None

    def _plan(self, job: _Job) -> tuple[nn.Module, RankPlan]:
        """The model to compress (on the meta device when streamed) and its checked plan."""
        job.lazy = LazyCheckpoint(self.source) if job.streamed else None
        model = job.lazy.model if job.streamed else self.model
        check_compressible(model)
        if not job.streamed:
            check_materialized(model)
        check_finite_weights(job.lazy.tensors() if job.streamed else model.named_parameters())
        try:
            plan = self._streamed_plan(job) if job.streamed else self._in_memory_plan(job, model)
        except UnreachableTargetError as error:
            if job.config.ratio_of == "model":
                raise
            whole = model_ratio(job.config, model)
            raise UnreachableTargetError(
                f"params_ratio={job.config.params_ratio} of the decoder linears is {whole:.3f} of the whole "
                f"model, and {error}"
            ) from None
        job.method.check(job.config, plan, job.data)
        job.config.kept_ratios = {name: round(value, 6) for name, value in kept_ratios(model, plan).items()}
        if job.save_dir is not None and not job.streamed:
            check_output_space(job.save_dir, plan.kept_params * model.dtype.itemsize)
        return model, plan

    def _in_memory_plan(self, job: _Job, model: nn.Module) -> RankPlan:
        """The pass's plan for a model in memory; a measurement spills to a temporary directory, which
        lives until the plan is applied (a Fisher-metric plan reads its covariances from it)."""
        if job.method.measures(job.config):
            job.scratch = Path(tempfile.mkdtemp(prefix="rom-measurement-"))
        return job.method.plan(model, job.config, job.data, job.progress, scratch=job.scratch)

    def _streamed_plan(self, job: _Job) -> RankPlan:
        """The pass's plan for a streamed run. A measured plan is kept in the work directory: a rerun of
        a killed run finds it there instead of measuring the model again (adaptive allocation's walks
        cost about as much as the compression). What the measurement spills goes there too."""
        if not job.method.measures(job.config):
            return job.method.plan(job.lazy.model, job.config, job.data, job.progress, weights=job.lazy)
        job.work_dir = job.work_dir or default_work_dir(job.save_dir)
        fingerprint = plan_fingerprint(job.lazy, job.config, job.data)
        with WorkDir(job.work_dir, fingerprint, what=str(job.save_dir)) as work:
            if "plan" in work.progress:
                return RankPlan(**work.progress["plan"])
            plan = job.method.plan(
                job.lazy.model, job.config, job.data, job.progress, weights=job.lazy, scratch=job.work_dir
            )
            work.record(plan=asdict(plan))
            return plan

    def _apply(self, job: _Job, model: nn.Module, plan: RankPlan) -> None:
        if job.streamed:
            path = compress_streaming(
                job.lazy, self.tokenizer, job.config, plan, job.data, job.method.apply, job.save_dir,
                job.overwrite, job.progress,
            )  # fmt: skip
            # in the checkpoint's dtype, as an in-memory run returns it: in float32 a bfloat16 7B
            # model would be materialized whole (~22 GB), where its own dtype stays memory-mapped
            self._model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
            return
        dtype = model.dtype  # half-precision weights are compressed in float32, returned in their own dtype
        job.method.apply(
            model.float(), job.config, job.data, plan, progress=job.progress, work_dir=job.work_dir
        )
        model.to(dtype)
        attach_quantizer(model, job.config)

    def _heal(self, job: _Job, spec: HealingSpec | None, teacher: nn.Module | None) -> HealingReport | None:
        """The healing stage the config asks for, whatever the pass: on the calibration windows, or
        on the pass's own prompt/answer examples."""
        if spec is None:
            return None
        if spec.within_budget:
            used = (time.perf_counter() - job.started) / 60
            if used >= spec.minutes:
                warnings.warn(
                    f"time_budget={spec.minutes:g} min: the compression took {used:.1f} min of it, so no time "
                    "is left to heal; the model is saved unhealed (a larger time budget heals it)",
                    stacklevel=3,
                )
                return None
            spec = replace(spec, minutes=spec.minutes - used)
        if spec.distill and teacher is None:
            teacher = load_causal_lm(self.source)
        if job.method.data is PassData.TASK:
            loss = AnswerLoss(job.data, spec.batch_size, job.config.seed)
        else:
            loss = WindowLoss(job.heal_data, teacher if spec.distill else None, spec.batch_size)
        return heal(self._model, loss, spec, job.progress)

    def _input_paths(self) -> list[Path | None]:
        """Where the model came from, which no output may overwrite."""
        if self.source is not None:
            return [self.source]
        loaded_from = getattr(getattr(self._model, "config", None), "_name_or_path", None)
        return [Path(loaded_from) if loaded_from else None]

    def _calibration_source(
        self,
        config: LowRankConfig,
        calibration: CalibrationSource | None,
        train_dataset: TaskSource | None,
        chat: bool,
    ) -> CalibrationSource:
        """The calibration to use: the given one; given none, self-calibration for a chat model and the
        bundled WikiText-2 excerpt for any other."""
        name = type(config).__name__
        if train_dataset is not None:
            raise ValueError(
                f"{name} calibrates on text, not on prompt/answer pairs: pass calibration= instead of "
                "train_dataset= (a jsonl works too: calibration='data.jsonl', text_field='question,answer')"
            )
        if calibration is None:  # chat models answer the bundled prompts; others read the bundled text
            calibration = (
                ChatCalibration() if getattr(self.tokenizer, "chat_template", None) else BUNDLED_TEXT
            )
        if self.tokenizer is None and not isinstance(calibration, torch.Tensor):
            raise ValueError(
                "text calibration needs a tokenizer: pass tokenizer= to LowRankOptimizer.from_pretrained"
            )
        source = as_chat_calibration(calibration, chat) or calibration
        if isinstance(source, ChatCalibration) and source.conversations is None:
            # a window starts at a conversation's start and cuts it at its end: answer tokens past the
            # longest window (calibration or healing) would be generated and never read
            longest = max(config.seq_len, HEAL_SEQ_LEN if config.healing() is not None else 0)
            source = replace(source, max_new_tokens=min(source.max_new_tokens, longest))
        return source

    def _dense_identity(self) -> str:
        """Names the dense weights for the answer cache. The source's files whenever the model in
        memory is what they hold, so a streamed and an in-memory run of one model share their answers."""
        if self.source is not None and self._holds_source:
            return files_identity(self.source)
        return weights_identity(self._model)

    def _calibration_data(
        self,
        config: LowRankConfig,
        calibration: CalibrationSource,
        text_field: str,
        streamed: bool,
        progress: bool,
    ) -> tuple[CalibrationSet, CalibrationSet | None]:
        """The calibration windows, and the healing windows when the config heals.

        Self-calibration generates with the dense model, so both are made before it is compressed:
        with the model in memory, or (streamed runs) with a copy loaded only if its answers are not
        cached yet, and freed once they are.
        """
        dense = None
        if isinstance(calibration, ChatCalibration) and calibration.conversations is None:
            dense = Answerer(
                self._dense_identity(), lambda: load_causal_lm(self.source) if streamed else self.model
            )
        seed, options = config.seed, (text_field, dense, progress)
        data = load_calibration(
            calibration, self.tokenizer, config.num_samples, config.seq_len, seed, *options
        )
        if len(data) < config.num_samples:
            warnings.warn(
                f"the chat calibration fills {len(data)} windows of {config.seq_len} tokens, fewer than the "
                f"{config.num_samples} asked for: give more conversations, or fewer or shorter samples "
                "(num_samples, seq_len)",
                stacklevel=3,
            )
        heal_data = None
        if config.healing() is not None:
            heal_data = load_calibration(
                calibration, self.tokenizer, HEAL_SAMPLES, HEAL_SEQ_LEN, seed + 1, *options
            )
        return data, heal_data

    def _training_examples(
        self,
        config: LowRankConfig,
        train_dataset: TaskSource | None,
        task: str | TaskFormat,
        calibration: CalibrationSource | None,
        holdout: int = 0,
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
        if holdout:
            pairs = split_pairs(pairs, holdout, seed=config.seed)[0]
        return training_examples(self.tokenizer, pairs, config.num_samples, config.seq_len, config.seed)

    def save(self, save_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the factorized checkpoint (safetensors + config + tokenizer) atomically."""
        check_output_dir(save_dir, overwrite, inputs=self._input_paths())
        size = stored_bytes(self.model)
        check_output_space(save_dir, size)
        with atomic_directory(save_dir, overwrite, size=size) as partial:
            self.model.save_pretrained(partial)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(partial)
        self.write_model_card(save_dir)
        return Path(save_dir)

    def write_model_card(self, save_dir: str | Path) -> None:
        """Add the model card (``README.md``) to a saved factorized checkpoint."""
        config = getattr(self.model.config, "quantization_config", None)
        if isinstance(config, LowRankConfig):
            write_model_card(Path(save_dir), config, self.model, self.report)

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs) -> PreTrainedModel:
        """optimum's ``OptimumQuantizer`` interface: same as :meth:`compress` with a ``save_dir``."""
        return self.compress(save_dir=save_dir, **kwargs)
