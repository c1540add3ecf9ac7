"""sparse-prefill: dynamic sparse attention for fast prefill of very long prompts.

Importing this package never initialises CUDA.
"""

from .attention import sparse_attention
from .decoding import PageSummaries, page_summaries, sparse_decode_attention
from .generation import chunked_prefill
from .patterns import AShape, BlockCoverage, BlockSparse, Dense, PatternConfig, VerticalSlash
from .reference import ReferenceResult, reference_attention
from .varlen import sparse_attention_varlen

__version__ = "0.1.0"


def enable(model, config=None, *, preset="default", min_seq_len=None, decode="dense"):
    """Switch a transformers model to sparse prefill; see :func:`sparse_prefill.integrations.transformers.enable`.

    transformers is imported on this first call, not when ``sparse_prefill`` is imported.
    """
    from .integrations import transformers as integration

    return integration.enable(model, config, preset=preset, min_seq_len=min_seq_len, decode=decode)


def disable(model):
    """Restore the model's previous attention; see :func:`sparse_prefill.integrations.transformers.disable`."""
    from .integrations import transformers as integration

    return integration.disable(model)


def register():
    """Register ``attn_implementation="sparse_prefill"`` with transformers (imports transformers)."""
    from .integrations import transformers as integration

    integration.register()

__all__ = [
    "AShape",
    "BlockCoverage",
    "BlockSparse",
    "Dense",
    "PatternConfig",
    "VerticalSlash",
    "ReferenceResult",
    "reference_attention",
    "sparse_attention",
    "sparse_attention_varlen",
    "PageSummaries",
    "page_summaries",
    "sparse_decode_attention",
    "chunked_prefill",
    "enable",
    "disable",
    "register",
    "__version__",
]
