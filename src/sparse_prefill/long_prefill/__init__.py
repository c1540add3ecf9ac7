"""Prefill of very long prompts (up to ~1M tokens on one 80 GB GPU) through a Llama-like HF model.

A plain transformers forward over 1M tokens of a Llama-3-8B-shaped model needs far more than 80 GB:
the MLP's ``[seq, 14336]`` intermediates are 28 GiB each, RoPE makes four temporaries the size of
Q, logits over every position are ``seq x 128256`` floats, and the KV cache alone is 128 GiB in
bf16. :func:`prefill` runs the same model, with its own modules and weights, so that only what
attention needs lives at full length:

- everything but attention (norms, projections, RoPE, MLP, residual adds) runs in chunks of
  ``chunk_size`` tokens, writing into full-length Q/K/V buffers or adding into the residual
  stream in place, compiled with ``torch.compile`` on a GPU so that its elementwise passes fuse
  (``fuse=``);
- attention runs once per layer over the whole sequence: sparse prefill's attention on a model
  switched with :func:`sparse_prefill.enable`, dense SDPA otherwise, or a function passed in;
- logits are computed for the last position only;
- the KV cache is not kept (``cache=None``, prefill only: the first token), kept on the GPU
  (``"device"``), or copied to pinned host memory layer by layer on a side stream while the next
  layer computes (``"offload"``); either can store FP8 (``kv_dtype=torch.float8_e4m3fn``, one
  scale per token and KV head), which halves its size.

:func:`generate` continues greedily from a kept cache: dense by default (an offloaded cache is
streamed back layer by layer, the next layer's copy overlapping the current layer's compute), or
sparse with ``decode="sparse"``, each step reading only the cache pages its query selects
(:mod:`sparse_prefill.decoding`; offloaded, only those pages cross PCIe).
:func:`memory_needed` says what a prefill will take, and :func:`prefill` refuses a length that
cannot fit with a :class:`PrefillMemoryError` naming the memory needed, before allocating anything.
A CUDA out-of-memory error in the middle of a prefill frees everything the prefill allocated
before it is raised again, so the process can go on.

"Llama-like" means: decoder layers made of exactly ``input_layernorm``, ``self_attn``,
``post_attention_layernorm`` and ``mlp``; attention with separate ``q_proj``/``k_proj``/
``v_proj``/``o_proj`` (optionally Qwen3's ``q_norm``/``k_norm``), full rotate-half RoPE from the
model's ``rotary_emb``, no sliding window shorter than the prompt. Llama, Mistral (without a
window), Qwen2 and Qwen3 qualify; anything else is refused with the reason.

Where things are: :mod:`.adapter` (which models qualify, and their pieces), :mod:`.memory` (the
memory model and the fit check), :mod:`.cache` (the KV cache modes), :mod:`.attention` (the
attention each layer calls), :mod:`.layer` (a layer's per-chunk work, fused or not),
:mod:`.forward` (the chunked forward), :mod:`.context_parallel` (the same forward with the
positions split over the ranks of a ``torch.distributed`` group: :func:`context_parallel_prefill`)
and :mod:`.decode` (decoding from a kept cache).
"""

from __future__ import annotations

from .attention import AttentionFn, sdpa_attention
from .cache import KVCache
from .context_parallel import context_parallel_prefill
from .decode import decode_step, generate
from .forward import PrefillResult, prefill
from .memory import DEFAULT_CHUNK_SIZE, PrefillMemory, PrefillMemoryError, memory_needed

__all__ = [
    "AttentionFn",
    "DEFAULT_CHUNK_SIZE",
    "KVCache",
    "PrefillMemory",
    "PrefillMemoryError",
    "PrefillResult",
    "context_parallel_prefill",
    "decode_step",
    "generate",
    "memory_needed",
    "prefill",
    "sdpa_attention",
]
