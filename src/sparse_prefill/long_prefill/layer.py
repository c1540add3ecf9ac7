"""The per-chunk work of a decoder layer, everything but attention: run as is, or fused by torch.compile.

A layer of the chunked forward is: for each chunk, :func:`pre_attention` (input norm, Q/K/V
projections, RoPE, written into the full-length Q/K/V buffers); one attention call over the whole
sequence; for each chunk, :func:`post_attention` (o_proj and residual add, post-attention norm,
MLP, residual add). Run as written, every elementwise step is its own pass over the chunk (the
float32 RMSNorm alone is several, RoPE four temporaries the size of Q, then SiLU, the product, the
adds): at Llama-3-8B shapes those passes took over a third of the non-attention time on an H200
(issue 15). :func:`layer_bodies` with ``fuse=True`` compiles the two bodies with
``torch.compile``, which fuses the elementwise work into a few kernels around the matrix
products; the bodies are the same Python functions either way, calling the model's own modules.

One compiled graph per body serves every layer, chunk length and prompt length: the bodies take
the layer as an argument (its weights are graph inputs, so the layers share the graph) and are
compiled with ``dynamic=True`` (the chunk length varies at the last chunk, and the buffers' strides
with the prompt length). On a GPU there is one more graph per body, for buffers of more than
2**31 elements: inductor indexes with 32-bit integers where every buffer fits, guarding on it, so
the first such prompt (512K tokens at Llama-3-8B shapes) compiles again with 64-bit indices. A
model that cannot be compiled (or a machine without a compiler) runs the bodies unfused, with one
warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .adapter import _project_qkv, _rope

__all__ = ["LayerBodies", "layer_bodies", "post_attention", "pre_attention", "rope_tables"]


def pre_attention(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
) -> None:
    """One chunk's Q, K, V (after RoPE), written into slices of the full-length buffers.

    hidden : [batch, n, hidden], the chunk of the residual stream (read only)
    cos, sin : [1, n, head_dim]
    q_out : [batch, q_heads, n, head_dim]; k_out, v_out : [batch, kv_heads, n, head_dim]
        Views of the layer's Q/K/V buffers at the chunk's positions, overwritten.
    """
    attention = layer.self_attn
    q, k, v = _project_qkv(attention, layer.input_layernorm(hidden), attention.head_dim)
    q_out.copy_(_rope(q, cos, sin))
    k_out.copy_(_rope(k, cos, sin))
    v_out.copy_(v)


def post_attention(layer: torch.nn.Module, hidden: torch.Tensor, attention_out: torch.Tensor) -> None:
    """One chunk of the residual stream after attention: add the output projection, then the MLP.

    hidden : [batch, n, hidden], the chunk of the residual stream, updated in place
    attention_out : [batch, n, q_heads, head_dim], the attention output at the chunk's positions
    """
    batch, n, _ = hidden.shape
    hidden += layer.self_attn.o_proj(attention_out.reshape(batch, n, -1))
    hidden += layer.mlp(layer.post_attention_layernorm(hidden))


@dataclass(frozen=True)
class LayerBodies:
    """The two per-chunk bodies the chunked forward calls, with :func:`pre_attention`'s and
    :func:`post_attention`'s signatures."""

    pre_attention: Callable[..., None]
    post_attention: Callable[..., None]

    def project(self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                shape: tuple[int, int, int], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of every row of ``hidden`` [batch, n, hidden], RoPE'd, ``chunk_size`` rows at a time.

        ``shape`` is (q_heads, kv_heads, head_dim); returns [batch, heads, n, head_dim] buffers.
        """
        batch, n = hidden.shape[:2]
        q_heads, kv_heads, head_dim = shape
        q = hidden.new_empty(batch, q_heads, n, head_dim)
        k = hidden.new_empty(batch, kv_heads, n, head_dim)
        v = hidden.new_empty(batch, kv_heads, n, head_dim)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            self.pre_attention(layer, hidden[:, rows], cos[:, rows], sin[:, rows], q[:, :, rows], k[:, :, rows],
                               v[:, :, rows])
        return q, k, v

    def finish(self, layer: torch.nn.Module, hidden: torch.Tensor, attention_out: torch.Tensor, chunk_size: int) -> None:
        """The rest of the layer over ``attention_out`` [batch, n, q_heads, head_dim], into ``hidden`` in place.

        Both residual adds of a chunk in one body: every chunk's output projection before any MLP
        gave the same values but read the residual stream twice.
        """
        for start in range(0, hidden.shape[1], chunk_size):
            rows = slice(start, start + chunk_size)
            self.post_attention(layer, hidden[:, rows], attention_out[:, rows])


def rope_tables(rotary_emb: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's RoPE cos/sin [1, n, head_dim] at ``positions`` [1, n]; refuses partial rotary."""
    cos, sin = rotary_emb(torch.empty(0, dtype=dtype, device=positions.device), positions)
    if cos.shape[-1] != head_dim:
        raise ValueError(f"long prefill needs RoPE over the whole head ({head_dim}), got rotary dim {cos.shape[-1]}")
    return cos, sin


UNFUSED = LayerBodies(pre_attention, post_attention)

# What compiles the bodies; the tests put a counting or failing backend here.
_BACKEND: Any = "inductor"
# The fused bodies, one pair per backend: built on first use (importing compiles nothing), and
# shared by every model, since torch.compile keeps its graphs per function anyway.
_FUSED: dict[Any, LayerBodies] = {}


def layer_bodies(fuse: bool) -> LayerBodies:
    """The bodies as written (``fuse=False``) or compiled with torch.compile (``fuse=True``)."""
    if not fuse:
        return UNFUSED
    backend = _BACKEND
    if backend not in _FUSED:
        _FUSED[backend] = LayerBodies(_Compiled(pre_attention, backend), _Compiled(post_attention, backend))
    return _FUSED[backend]


class _Compiled:
    """A body compiled with torch.compile, or the body itself for a layer type that does not compile."""

    def __init__(self, body: Callable[..., None], backend: Any) -> None:
        self.body = body
        # dynamic=True: one graph for every chunk length, prompt length and layer (otherwise each
        # new last-chunk length or prompt length compiles anew, until dynamo's limit of 8 and
        # eager after it). fullgraph=True: the whole body compiles before any of it runs, so
        # running the body itself after a failure never applies a residual add twice.
        self.compiled = torch.compile(body, backend=backend, dynamic=True, fullgraph=True)
        self.failed: set[type] = set()

    def __call__(self, layer: torch.nn.Module, *tensors: torch.Tensor) -> None:
        kind = type(layer)
        if kind not in self.failed:
            try:
                return self.compiled(layer, *tensors)
            # Any failure to trace or compile (no C++ compiler, no Triton, a module dynamo cannot
            # trace, dynamo's limit of graphs per function reached), all raised before any of the
            # body ran; a real error in the body raises again below, from the body itself.
            except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
                self.failed.add(kind)
                reason = str(error).strip().split("\n\n")[0].replace("\n", " ")  # without dynamo's advice
                warnings.warn(
                    f"long prefill: torch.compile of {self.body.__name__} failed for {kind.__name__}, which "
                    f"runs unfused from now on (prefill(..., fuse=False) says so explicitly): "
                    f"{type(error).__name__}: {reason[:300]}",
                    RuntimeWarning,
                    stacklevel=4,  # the caller of prefill
                )
        return self.body(layer, *tensors)
