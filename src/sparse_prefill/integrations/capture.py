"""Capture the post-RoPE Q/K/V that a transformers model feeds its attention, layer by layer.

The real workload of the kernel benchmark, the pattern search and the recall measurements all need
the exact tensors a model attends with. This registers one more attention function through
transformers' public ``AttentionInterface``; it records its inputs for the chosen layers and then
runs transformers' own SDPA, so the forward pass is unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

CAPTURE_NAME = "sparse_prefill_capture"

__all__ = ["capture_qkv"]


def capture_qkv(model: Any, input_ids: torch.Tensor, layers: Iterable[int], *, device: str | torch.device = "cpu") -> dict:
    """Run ``model(input_ids)`` once and return ``{layer: (q, k, v)}`` for ``layers``.

    q : [batch, q_heads, seq, head_dim]; k, v : [batch, kv_heads, seq, head_dim], as the attention
    function receives them (after RoPE, K/V not repeated), copied to ``device``.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    wanted = set(layers)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in wanted:
            captured[module.layer_idx] = tuple(t.detach().to(device) for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, capture)
    AttentionMaskInterface.register(CAPTURE_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.no_grad():
            model(input_ids, logits_to_keep=1, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    missing = wanted - set(captured)
    if missing:
        raise ValueError(f"layers {sorted(missing)} were not captured; the model has layers 0..{model.config.num_hidden_layers - 1}")
    return captured
