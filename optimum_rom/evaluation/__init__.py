"""Quality measurements of dense and compressed models."""

from .perplexity import PerplexityResult, stream_perplexity, text_perplexity
from .task_loss import TaskLossResult, answer_loss, answer_nll

__all__ = [
    "PerplexityResult",
    "TaskLossResult",
    "answer_loss",
    "answer_nll",
    "stream_perplexity",
    "text_perplexity",
]
