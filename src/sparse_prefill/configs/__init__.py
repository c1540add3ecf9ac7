"""Pattern configs shipped with the package, found by the architecture of the model they were searched for.

Each ``*.json`` here is a :class:`~sparse_prefill.patterns.PatternConfig` written by
``sparse-prefill search``; its ``metadata["model_signature"]`` holds the architecture fields
(:func:`sparse_prefill.search.run.model_signature`) a model must match for the config to be its
default. Matching is by architecture, not by weights: a fine-tune of the same base model matches
too, and its heads may have moved; search it again to be sure.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ..patterns import PatternConfig

__all__ = ["model_signature", "shipped_configs", "shipped_config_for"]

_HERE = Path(__file__).parent
SIGNATURE_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                    "intermediate_size", "vocab_size")


@lru_cache(maxsize=None)
def shipped_configs() -> dict[str, PatternConfig]:
    """``{file name: config}`` of every config shipped in ``sparse_prefill/configs``."""
    return {path.name: PatternConfig.load(path) for path in sorted(_HERE.glob("*.json"))}


def model_signature(model_config: Any) -> dict:
    """The architecture fields of a transformers config that a shipped config is matched on."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return {name: getattr(text, name, None) for name in SIGNATURE_FIELDS}


def shipped_config_for(model_config: Any) -> PatternConfig | None:
    """The shipped config searched for this architecture (a transformers config), or None."""
    signature = model_signature(model_config)
    for config in shipped_configs().values():
        if config.metadata.get("model_signature") == signature:
            return config
    return None
