"""Quality measurements of dense and compressed models."""

from .perplexity import PerplexityResult, stream_perplexity, text_perplexity
from .suite import TASKS, EvaluationOptions, evaluate
from .task_loss import TaskLossResult, answer_loss

__all__ = [
    "TASKS",
    "EvaluationOptions",
    "PerplexityResult",
    "TaskLossResult",
    "answer_loss",
    "evaluate",
    "stream_perplexity",
    "text_perplexity",
]
