"""sparse-prefill: dynamic sparse attention for fast prefill of very long prompts.

Importing this package never initialises CUDA.
"""

from .attention import sparse_attention
from .patterns import AShape, BlockSparse, Dense, PatternConfig, VerticalSlash
from .reference import ReferenceResult, reference_attention

__version__ = "0.1.0"

__all__ = [
    "AShape",
    "BlockSparse",
    "Dense",
    "PatternConfig",
    "VerticalSlash",
    "ReferenceResult",
    "reference_attention",
    "sparse_attention",
    "__version__",
]
