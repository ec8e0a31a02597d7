"""Quality measurements of dense and compressed models."""

from .perplexity import PerplexityResult, stream_perplexity, text_perplexity
from .task_loss import TaskLossResult, answer_loss

__all__ = ["PerplexityResult", "TaskLossResult", "answer_loss", "stream_perplexity", "text_perplexity"]
