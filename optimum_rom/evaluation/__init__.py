"""Quality measurements of dense and compressed models."""

from .perplexity import PerplexityResult, stream_perplexity, text_perplexity

__all__ = ["PerplexityResult", "stream_perplexity", "text_perplexity"]
