"""Dynamic sparse decoding: each generated token attends only to the KV-cache pages it needs.

Quest-style (Tang et al., ICML 2024) page selection, GQA-aware, in three steps (docs/semantics.md,
"Sparse decoding", states exactly what is kept):

1. :class:`PageSummaries`, built once after prefill and extended as decoding appends keys: per
   page of ``page_size`` keys and per KV head, the per-channel minimum and maximum of the keys.
2. :func:`select_pages` ("plan"): per decode step, an upper bound of every page's logits per query
   head, and per KV head the largest of its query heads' bounds; the sink and the recent window are
   always kept, the pages of highest bound fill the budget. One selection per KV head serves all
   its query heads.
3. :func:`decode_attention` ("run"): the attention of the step's queries over exactly the selected
   pages; a Triton split-K kernel on CUDA (``kernels/decode.py``), PyTorch elsewhere.

:func:`sparse_decode_attention` does 2 and 3; :func:`recovery_ratio` measures how much of the dense
attention the selected keys hold.

Nothing here synchronises the host with the GPU on the per-step path (no ``.item()``, no
data-dependent shapes): the number of selected pages follows from the cache length and the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import check_scale

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_LOCAL",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_SINK",
    "PageSelection",
    "PageSummaries",
    "SparseDecoding",
    "choose_pages",
    "decode_attention",
    "decode_attention_reference",
    "forced_pages",
    "page_attention_mass",
    "page_ranking_keys",
    "page_scores",
    "page_summaries",
    "page_upper_bounds",
    "recovery_ratio",
    "select_pages",
    "sparse_decode_attention",
]

# Half Quest's 16. A page's bound is the box around its keys, and the box loosens as the page grows:
# on SmolLM2 at 8K, a 512-token budget recovers 0.81 of the attention with 16-key pages, 0.77 with
# 32 and 0.73 with 64, and 8-key pages keep needles that 16-key pages lose at the same budget (8K,
# budget 2048: 4 of dense's 4 against 3; docs/ACCURACY.md). The summaries then hold 2/8 of the keys'
# size (1/8 of K and V together); the kernel gathers eight pages per 64-key tile.
DEFAULT_PAGE_SIZE = 8
DEFAULT_BUDGET = 2048  # tokens per KV head and step, sink and window included
DEFAULT_SINK = 16  # the first two pages: attention sinks (StreamingLLM keeps 4 tokens)
DEFAULT_LOCAL = 64  # the recent window, the current token's own key included

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- argument checks ---------------------------------------------------------------------------------


def _check_tensor(tensor: torch.Tensor, name: str, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 4:
        raise ValueError(f"{name} must have rank 4 {layout}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype={tensor.dtype}")


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return value


def _check_query(q: torch.Tensor, kv_heads: int, head_dim: int, batch: int, what: str) -> int:
    """``q`` [batch, q_heads, 1, head_dim] against a cache of ``kv_heads`` heads; returns the group size."""
    _check_tensor(q, "q", "[batch, q_heads, 1, head_dim]")
    if q.shape[2] != 1:
        raise ValueError(f"q holds one decode step: shape [batch, q_heads, 1, head_dim], got q_len={q.shape[2]} "
                         f"(shape {tuple(q.shape)})")
    if q.shape[0] != batch:
        raise ValueError(f"q and {what} must have the same batch size, got q batch={q.shape[0]}, {what} batch={batch}")
    if q.shape[3] != head_dim:
        raise ValueError(f"q and {what} must have the same head_dim, got q head_dim={q.shape[3]}, "
                         f"{what} head_dim={head_dim}")
    if q.shape[1] == 0 or q.shape[1] % kv_heads:
        raise ValueError(f"the number of query heads must be a positive multiple of the number of KV heads, "
                         f"got q_heads={q.shape[1]}, kv_heads={kv_heads}")
    return q.shape[1] // kv_heads


def _check_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str] = ("k", "v")) -> int:
    """q [batch, q_heads, 1, d] and k/v [batch, kv_heads, n_keys, d]; returns the GQA group size."""
    k_name, v_name = names
    for name, tensor in ((k_name, k), (v_name, v)):
        _check_tensor(tensor, name, "[batch, kv_heads, n_keys, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape, got {k_name}={tuple(k.shape)}, "
                         f"{v_name}={tuple(v.shape)}")
    if min(k.shape) == 0:
        raise ValueError(f"{k_name} must have no empty dimension, got shape {tuple(k.shape)}")
    group = _check_query(q, k.shape[1], k.shape[3], k.shape[0], k_name)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, {k_name} and {v_name} must share one dtype, got q={q.dtype}, {k_name}={k.dtype}, "
                        f"{v_name}={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, {k_name} and {v_name} must be on one device, got q={q.device}, {k_name}={k.device}, "
                         f"{v_name}={v.device}")
    return group


def _check_selection(selection: PageSelection, k: torch.Tensor, name: str = "k") -> None:
    if not isinstance(selection, PageSelection):
        raise TypeError(f"selection must be a PageSelection (from select_pages), got {type(selection).__name__}")
    if selection.n_keys != k.shape[2]:
        raise ValueError(f"the selection is for {selection.n_keys} keys, {name} holds n_keys={k.shape[2]}")
    if tuple(selection.pages.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"the selection is for [batch, kv_heads]={list(selection.pages.shape[:2])}, "
                         f"{name} has [batch, kv_heads]={list(k.shape[:2])}")
    if selection.pages.device != k.device:
        raise ValueError(f"the selection's pages must be on {name}'s device, got {selection.pages.device} and {k.device}")


def _check_budget(budget: int, sink: int, local: int) -> None:
    _check_int(budget, "budget", 1)
    _check_int(sink, "sink", 0)
    _check_int(local, "local", 1)
    if budget < sink + local:
        raise ValueError(f"budget must be at least sink + local (the always-kept tokens), got budget={budget}, "
                         f"sink={sink}, local={local}")


@dataclass(frozen=True)
class SparseDecoding:
    """How decoding steps attend: the settings of :func:`sparse_decode_attention`, checked once.

    budget : int
        Keys per KV head and step, in whole pages, the forced ones included (default 2048).
    sink, local : int
        The first and the last keys, always kept (defaults 16 and 64).
    page_size : int
        Keys per page of the summaries (default 8).
    """

    budget: int = DEFAULT_BUDGET
    sink: int = DEFAULT_SINK
    local: int = DEFAULT_LOCAL
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        _check_budget(self.budget, self.sink, self.local)
        _check_int(self.page_size, "page_size", 1)


# --- 1. page summaries --------------------------------------------------------------------------------


class PageSummaries:
    """Per-page, per-channel minimum and maximum of the keys of one layer's KV cache.

    Page ``p`` holds keys ``p * page_size .. min((p + 1) * page_size, n_keys) - 1``; only the last
    page may be partial. Build it with :func:`page_summaries` once after prefill and call
    :meth:`append` with every key the cache appends. The extremes are stored in the keys' dtype
    (min and max of bf16 values are bf16 values: exact).

    Attributes
    ----------
    key_min, key_max : Tensor [batch, kv_heads, n_pages, head_dim]
        Views of the filled pages (the storage has room for more: appending seldom reallocates).
    page_size, n_keys, n_pages : int
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, *, page_size: int = DEFAULT_PAGE_SIZE,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu", capacity: int = 0):
        self.page_size = _check_int(page_size, "page_size", 1)
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            _check_int(value, name, 1)
        _check_int(capacity, "capacity", 0)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got dtype={dtype}")
        self.n_keys = 0
        pages = max(1, math.ceil(capacity / page_size))
        shape = (batch, kv_heads, pages, head_dim)
        self._min = torch.empty(shape, dtype=dtype, device=device)  # [batch, kv_heads, capacity_pages, head_dim]
        self._max = torch.empty(shape, dtype=dtype, device=device)

    @property
    def n_pages(self) -> int:
        return -(-self.n_keys // self.page_size)

    @property
    def key_min(self) -> torch.Tensor:
        return self._min[:, :, : self.n_pages]

    @property
    def key_max(self) -> torch.Tensor:
        return self._max[:, :, : self.n_pages]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, kv_heads, n_keys, head_dim)`` of the cache it summarises."""
        batch, kv_heads, _, head_dim = self._min.shape
        return batch, kv_heads, self.n_keys, head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self._min.dtype

    @property
    def device(self) -> torch.device:
        return self._min.device

    def _reserve(self, n_pages: int) -> None:
        if n_pages <= self._min.shape[2]:
            return
        grown = max(n_pages, 2 * self._min.shape[2])  # doubling: appending one token at a time stays O(1) amortised
        for name in ("_min", "_max"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], grown, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def append(self, keys: torch.Tensor, *, check_finite: bool = True) -> PageSummaries:
        """Fold ``keys`` [batch, kv_heads, new, head_dim], the keys just appended to the cache (positions
        ``n_keys .. n_keys + new - 1``), into the summaries: the partial last page is updated, new
        pages are added. Returns ``self``. ``keys`` may live on another device (an offloaded cache).

        ``check_finite=False`` skips the NaN/Inf check, which reads the GPU: a decoder appending one
        key per layer and step would otherwise wait for the GPU that often. A decoded NaN key has
        already made its own step's attention NaN (its page is in the forced window)."""
        _check_tensor(keys, "keys", "[batch, kv_heads, new, head_dim]")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__} {check_finite!r}")
        batch, kv_heads, n_keys, head_dim = self.shape
        if (keys.shape[0], keys.shape[1], keys.shape[3]) != (batch, kv_heads, head_dim):
            raise ValueError(f"keys must be [batch={batch}, kv_heads={kv_heads}, new, head_dim={head_dim}], "
                             f"got shape {tuple(keys.shape)}")
        if keys.dtype != self.dtype:
            raise TypeError(f"keys must have the summaries' dtype {self.dtype}, got dtype={keys.dtype}")
        new = keys.shape[2]
        if new == 0:
            return self
        # Checked here, once per appended block, not per decode step's attention: a NaN key would
        # make every bound of its page NaN and its page's rank undefined.
        if check_finite and not bool(torch.isfinite(torch.stack([keys.amax(), keys.amin()])).all()):
            raise ValueError("keys contains NaN or Inf; page summaries need finite keys")
        keys = keys.to(self.device)
        page_size = self.page_size
        self._reserve(-(-(n_keys + new) // page_size))
        start = 0
        fill = n_keys % page_size
        if fill:  # complete the partial last page
            start = min(page_size - fill, new)
            page = n_keys // page_size
            head = keys[:, :, :start]
            torch.minimum(self._min[:, :, page], head.amin(2), out=self._min[:, :, page])
            torch.maximum(self._max[:, :, page], head.amax(2), out=self._max[:, :, page])
        first_page = -(-n_keys // page_size)  # the first page that starts in `keys`
        rest = keys[:, :, start:]
        whole = rest.shape[2] // page_size * page_size
        if whole:  # whole pages through a view: no copy of the keys
            pages = rest[:, :, :whole].unflatten(2, (whole // page_size, page_size))
            self._min[:, :, first_page : first_page + whole // page_size] = pages.amin(3)
            self._max[:, :, first_page : first_page + whole // page_size] = pages.amax(3)
        if whole < rest.shape[2]:  # a new partial page
            tail = rest[:, :, whole:]
            self._min[:, :, first_page + whole // page_size] = tail.amin(2)
            self._max[:, :, first_page + whole // page_size] = tail.amax(2)
        self.n_keys = n_keys + new
        return self

    def __repr__(self) -> str:
        batch, kv_heads, n_keys, head_dim = self.shape
        return (f"PageSummaries(batch={batch}, kv_heads={kv_heads}, n_keys={n_keys}, head_dim={head_dim}, "
                f"page_size={self.page_size}, n_pages={self.n_pages}, dtype={self.dtype}, device={self.device})")


def page_summaries(k: torch.Tensor, page_size: int = DEFAULT_PAGE_SIZE, *, capacity: int | None = None,
                   device: torch.device | str | None = None) -> PageSummaries:
    """Summaries of a KV cache's keys, once after prefill.

    Parameters
    ----------
    k : Tensor [batch, kv_heads, n_keys, head_dim]
        The cache's keys, as attention reads them (after RoPE), any float dtype; ``n_keys`` may be 0.
    page_size : int
        Keys per page (:data:`DEFAULT_PAGE_SIZE`).
    capacity : int, optional
        Keys to reserve room for (the prompt plus the tokens to generate): appending within it never
        reallocates, which keeps the storage's address fixed (CUDA graphs).
    device : optional
        Where the summaries live; ``k``'s device by default. With the cache offloaded to host memory,
        the summaries stay on the GPU.

    Returns
    -------
    PageSummaries
        ``key_min`` and ``key_max`` [batch, kv_heads, ceil(n_keys / page_size), head_dim], ``k``'s dtype.
    """
    _check_tensor(k, "k", "[batch, kv_heads, n_keys, head_dim]")
    _check_int(page_size, "page_size", 1)
    if capacity is not None:
        _check_int(capacity, "capacity", 0)
    batch, kv_heads, n_keys, head_dim = k.shape
    summaries = PageSummaries(batch, kv_heads, head_dim, page_size=page_size, dtype=k.dtype,
                              device=k.device if device is None else device, capacity=max(capacity or 0, n_keys))
    return summaries.append(k)


# --- 2. selection --------------------------------------------------------------------------------------


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def page_upper_bounds(q: torch.Tensor, summaries: PageSummaries, scale: float | None = None) -> torch.Tensor:
    """Per query head, an upper bound of the logits of every page's keys.

    ``bound[b, h, p] = scale * sum_c max(q[b, h, c] * key_min[b, g, p, c], q[b, h, c] * key_max[b, g, p, c])``
    with ``g`` the query head's KV head: no key of page ``p`` has a larger logit ``scale * q . k``.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim]
    summaries : PageSummaries
    scale : float, optional
        ``1/sqrt(head_dim)`` when None.

    Returns
    -------
    Tensor [batch, q_heads, n_pages], float32 (float64 for float64 inputs). On CUDA with float16 or
    bfloat16 inputs a Triton kernel computes it from the summaries as stored (exact products, float32
    sums in another order than PyTorch's).
    """
    batch, kv_heads, _, head_dim = summaries.shape
    group = _check_query(q, kv_heads, head_dim, batch, "summaries")
    scale = check_scale(scale, head_dim)
    if q.is_cuda and q.dtype in LOW_PRECISION and summaries.dtype == q.dtype:
        from .kernels.decode import page_bounds  # reads the summaries once, in their dtype

        return page_bounds(q, summaries.key_min, summaries.key_max, scale)
    dtype = _score_dtype(q.dtype)
    queries = q.to(dtype).reshape(batch, kv_heads, group, head_dim)
    # max(q c_min, q c_max) is q c_max where q >= 0 and q c_min where q < 0: two products, no
    # [group, pages, head_dim] temporary.
    bound = (torch.matmul(queries.clamp(min=0), summaries.key_max.to(dtype).transpose(-1, -2))
             + torch.matmul(queries.clamp(max=0), summaries.key_min.to(dtype).transpose(-1, -2)))
    return (bound * scale).view(batch, kv_heads * group, -1)  # [batch, q_heads, n_pages]


def page_scores(q: torch.Tensor, summaries: PageSummaries, scale: float | None = None) -> torch.Tensor:
    """One score per page and KV head: the largest logit bound of the page over the group's query heads.

    ``score[b, g, p] = max over the query heads h of KV head g of bound[b, h, p]``
    (:func:`page_upper_bounds`): no query head of the group gives any key of page ``p`` a larger
    logit. A page that one head's bound singles out (a needle) ranks high whatever the other heads
    of the group do. Summing per-head softmaxes of the bounds (the rule until 2026-11-30) keeps
    0.5-1.2 points more of the mean attention mass but lost needles that this rule keeps
    (docs/ACCURACY.md, "Which selection keeps the needle" and the subsection after it): a loose
    bound spreads a head's softmax over many pages and flattens the one page that matters. The
    ranking does not depend on ``scale`` (a positive factor of every bound).

    Returns
    -------
    Tensor [batch, kv_heads, n_pages], float32 (float64 for float64 inputs).
    """
    bounds = page_upper_bounds(q, summaries, scale)
    batch, kv_heads = summaries.shape[:2]
    return bounds.view(batch, kv_heads, -1, bounds.shape[-1]).amax(dim=2)


@dataclass(frozen=True)
class PageSelection:
    """The pages one decode step attends to: the same number for every batch element and KV head.

    Attributes
    ----------
    pages : Tensor [batch, kv_heads, n_selected], int32
        Page numbers, ascending, distinct; page ``p`` is keys ``p * page_size ..
        min((p + 1) * page_size, n_keys) - 1``.
    n_keys, page_size : int
    """

    pages: torch.Tensor
    n_keys: int
    page_size: int

    @property
    def n_selected(self) -> int:
        return self.pages.shape[-1]

    @property
    def n_pages(self) -> int:
        return -(-self.n_keys // self.page_size)

    def kept_mask(self) -> torch.Tensor:
        """bool [batch, kv_heads, n_keys]: True on the keys of the selected pages."""
        batch, kv_heads, _ = self.pages.shape
        pages = torch.zeros(batch, kv_heads, self.n_pages, dtype=torch.bool, device=self.pages.device)
        pages.scatter_(2, self.pages.long(), True)
        return pages.repeat_interleave(self.page_size, dim=2)[:, :, : self.n_keys]

    def kept_keys(self) -> int:
        """Keys kept per batch element and KV head (the same everywhere), for reports: ``n_selected *
        page_size`` less the partial last page's missing keys when it is selected (reads the GPU)."""
        last = self.n_pages - 1
        short = self.n_pages * self.page_size - self.n_keys  # the last page's missing keys
        return self.n_selected * self.page_size - short * int(bool((self.pages == last).any()))


def forced_pages(n_keys: int, page_size: int, sink: int, local: int) -> tuple[int, int]:
    """``(first_free, first_local)``: pages ``0 .. first_free - 1`` hold the sink, pages
    ``first_local .. n_pages - 1`` the recent window; the pages between are chosen by score.
    ``first_free <= first_local`` (they meet when the forced pages cover the cache)."""
    first_local = max(0, n_keys - local) // page_size
    first_free = min(-(-sink // page_size), first_local)
    return first_free, first_local


# Every forced page's ranking key: above any score's (the largest float32, +inf included, orders
# as 0x7F800000), so that one top-k over all pages takes the forced ones first.
FORCED_ORDER = 0x7FFFFFFF


def _ranking_key(scores: torch.Tensor, first_free: int, first_local: int) -> torch.Tensor:
    """int64 keys ordered as (forced first, then score descending, then page ascending), all
    distinct: ``topk`` on them picks one well-defined set whatever its own tie handling.
    ``scores`` [..., n_pages] float32 -> int64 [..., n_pages]. The GPU computes the same keys with
    the bounds (``kernels.decode.page_ranking_keys``)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # IEEE floats order as sign-magnitude integers: flipping a negative one's magnitude bits makes
    # the int32 order the float order.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    page = torch.arange(scores.shape[-1], device=scores.device)
    ordered = torch.where((page < first_free) | (page >= first_local), FORCED_ORDER, ordered)
    return (ordered << 32) + (scores.shape[-1] - 1 - page)  # a lower page wins a tie


def page_ranking_keys(q: torch.Tensor, summaries: PageSummaries, first_free: int, first_local: int,
                      scale: float | None = None) -> torch.Tensor:
    """:func:`page_scores` as ranking keys (int64 [batch, kv_heads, n_pages]) with pages outside
    ``first_free .. first_local - 1`` forced. On CUDA with float16/bfloat16 inputs one Triton
    kernel computes them from the summaries: bounds, the group's largest and the key in one pass
    (the separate steps were about ten small launches, most of a 128K step's selection time)."""
    if q.is_cuda and q.dtype in LOW_PRECISION and summaries.dtype == q.dtype:
        from .kernels.decode import page_ranking_keys as keys_on_gpu

        batch, kv_heads, _, head_dim = summaries.shape
        _check_query(q, kv_heads, head_dim, batch, "summaries")
        return keys_on_gpu(q, summaries.key_min, summaries.key_max, check_scale(scale, head_dim), first_free, first_local)
    return _ranking_key(page_scores(q, summaries, scale), first_free, first_local)


def select_pages(q: torch.Tensor, summaries: PageSummaries, *, budget: int = DEFAULT_BUDGET,
                 sink: int = DEFAULT_SINK, local: int = DEFAULT_LOCAL, scale: float | None = None) -> PageSelection:
    """The pages one decode step keeps, per batch element and KV head (docs/semantics.md, "Sparse decoding").

    The pages holding the first ``sink`` keys and the last ``local`` keys are always kept; the other
    pages are ranked by :func:`page_scores` (ties: the lower page first) and the best fill the
    budget of ``ceil(budget / page_size)`` pages. A budget of at least ``n_keys`` keeps every page.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim]
        The step's queries (after RoPE); ``q_heads`` a multiple of the cache's ``kv_heads``.
    summaries : PageSummaries
        Of the cache the step attends to, its key included (``n_keys >= 1``).
    budget : int
        Tokens per KV head, counted in whole pages, the forced ones included; ``>= sink + local``.
    sink, local : int
        Always-kept first keys (``>= 0``) and last keys (``>= 1``: the step's own key).
    scale : float, optional
        Softmax scale (``1/sqrt(head_dim)``); a positive factor of every bound, it does not change the
        ranking (but for ties that rounding may make).

    Returns
    -------
    PageSelection
        ``pages`` int32 [batch, kv_heads, n_selected] on the summaries' device, ascending, with
        ``n_selected = min(n_pages, max(ceil(budget / page_size), forced pages))``.
    """
    if not isinstance(summaries, PageSummaries):
        raise TypeError(f"summaries must be a PageSummaries (from page_summaries), got {type(summaries).__name__}")
    _check_budget(budget, sink, local)
    batch, kv_heads, n_keys, head_dim = summaries.shape
    _check_query(q, kv_heads, head_dim, batch, "summaries")
    if n_keys == 0:
        raise ValueError("summaries cover n_keys=0 keys: a decode step attends at least to its own key")
    if q.device != summaries.device:
        raise ValueError(f"q and summaries must be on one device, got q={q.device}, summaries={summaries.device}")
    first_free, first_local = forced_pages(n_keys, summaries.page_size, sink, local)
    if _n_chosen(n_keys, summaries.page_size, budget, first_free, first_local) in (0, first_local - first_free):
        keys = None  # nothing to rank: only forced pages, or every page (dense)
    else:
        keys = page_ranking_keys(q, summaries, first_free, first_local, scale)
    return _choose(keys, (batch, kv_heads), n_keys, summaries.page_size, budget, sink, local, summaries.device)


def choose_pages(scores: torch.Tensor, n_keys: int, page_size: int, *, budget: int = DEFAULT_BUDGET,
                 sink: int = DEFAULT_SINK, local: int = DEFAULT_LOCAL) -> PageSelection:
    """:func:`select_pages`'s rule on given scores: the forced pages, then the best-scored others.

    For selections by other scores than :func:`page_scores`: the true attention mass of each page
    (an oracle), or one step's scores reused at later steps (a static choice).

    Parameters
    ----------
    scores : Tensor [batch, kv_heads, ceil(n_keys / page_size)], float
        Higher is better; ranked as float32, ties to the lower page.
    n_keys, page_size, budget, sink, local : int
        As in :func:`select_pages`.

    Returns
    -------
    PageSelection
    """
    _check_int(n_keys, "n_keys", 1)
    _check_int(page_size, "page_size", 1)
    _check_budget(budget, sink, local)
    n_pages = -(-n_keys // page_size)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or scores.shape[2] != n_pages:
        raise ValueError(f"scores must be a tensor [batch, kv_heads, n_pages={n_pages}], got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    first_free, first_local = forced_pages(n_keys, page_size, sink, local)
    keys = _ranking_key(scores, first_free, first_local)
    return _choose(keys, tuple(scores.shape[:2]), n_keys, page_size, budget, sink, local, scores.device)


def _n_chosen(n_keys: int, page_size: int, budget: int, first_free: int, first_local: int) -> int:
    """How many pages between the sink's and the window's are chosen by score."""
    n_pages = -(-n_keys // page_size)
    n_forced = first_free + n_pages - first_local
    return min(n_pages, max(-(-budget // page_size), n_forced)) - n_forced


def _choose(keys: torch.Tensor | None, rows: tuple[int, int], n_keys: int, page_size: int, budget: int, sink: int,
            local: int, device: torch.device) -> PageSelection:
    """The selection from ranking keys [*rows, n_pages] (:func:`_ranking_key`), or None where no
    page is chosen by score (only the forced pages, or every page)."""
    first_free, first_local = forced_pages(n_keys, page_size, sink, local)
    n_chosen = _n_chosen(n_keys, page_size, budget, first_free, first_local)
    n_pages = -(-n_keys // page_size)

    def pages(start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=device, dtype=torch.int32).expand(*rows, -1)

    if n_chosen == first_local - first_free:  # every page is kept: dense
        return PageSelection(pages(0, n_pages).contiguous(), n_keys, page_size)
    if n_chosen == 0:
        return PageSelection(torch.cat([pages(0, first_free), pages(first_local, n_pages)], dim=-1).contiguous(),
                             n_keys, page_size)
    n_selected = first_free + n_chosen + n_pages - first_local
    if keys.is_cuda:  # a radix select over many programs: topk and a sort were most of a 128K step's selection
        from .kernels.decode import top_pages

        return PageSelection(top_pages(keys.contiguous(), n_selected), n_keys, page_size)
    best = torch.topk(keys, n_selected, dim=-1, sorted=False).indices  # the forced pages' keys rank first
    return PageSelection(best.sort(dim=-1).values.to(torch.int32), n_keys, page_size)


# --- 3. attention ---------------------------------------------------------------------------------------


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: PageSelection | None = None,
                               *, scale: float | None = None, return_lse: bool = False):
    """One decode step's attention over the selected pages (every key when ``selection`` is None), in PyTorch.

    A masked softmax in float32 (float64 for float64 inputs) over all ``n_keys`` logits: the
    definition the kernel is tested against, not a fast path.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim]
    k, v : Tensor [batch, kv_heads, n_keys, head_dim]
        The whole cache, the step's own key and value included; dtype and device of ``q``.
    selection : PageSelection, optional
        From :func:`select_pages` on this cache; None is exact dense decoding.
    scale : float, optional
        ``1/sqrt(head_dim)`` when None.
    return_lse : bool
        Also return the natural log-sum-exp of the kept logits.

    Returns
    -------
    out : Tensor [batch, q_heads, 1, head_dim], dtype of ``q``
    lse : Tensor [batch, q_heads, 1], float32 (float64 for float64 inputs); with ``return_lse`` only.
    """
    group = _check_cache(q, k, v)
    if selection is not None:
        _check_selection(selection, k)
    scale = check_scale(scale, q.shape[-1])
    dtype = _score_dtype(q.dtype)
    batch, kv_heads, n_keys, head_dim = k.shape
    queries = q.to(dtype).reshape(batch, kv_heads, group, head_dim)
    logits = torch.matmul(queries, k.to(dtype).transpose(-1, -2)) * scale  # [batch, kv_heads, group, n_keys]
    if selection is not None:
        logits = logits.masked_fill(~selection.kept_mask()[:, :, None], float("-inf"))
    lse = logits.logsumexp(dim=-1, keepdim=True)  # every row keeps its own page: finite
    out = torch.matmul(torch.exp(logits - lse), v.to(dtype))  # [batch, kv_heads, group, head_dim]
    out = out.view(batch, kv_heads * group, 1, head_dim).to(q.dtype)
    return (out, lse.view(batch, kv_heads * group, 1)) if return_lse else out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: PageSelection, *,
                     scale: float | None = None, return_lse: bool = False):
    """One decode step's attention over the selected pages: the Triton kernel for float16/bfloat16 CUDA
    tensors, :func:`decode_attention_reference` otherwise. Arguments and results as the reference's."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}")
    if isinstance(q, torch.Tensor) and q.is_cuda and q.dtype in LOW_PRECISION:
        from .kernels.decode import decode_over_pages  # lazy: importing the package never imports Triton

        _check_cache(q, k, v)
        _check_selection(selection, k)
        scale = check_scale(scale, q.shape[-1])
        return decode_over_pages(q, k, v, selection.pages, selection.n_keys, selection.page_size, scale,
                                 return_lse=return_lse)
    return decode_attention_reference(q, k, v, selection, scale=scale, return_lse=return_lse)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: PageSummaries, *,
                            budget: int = DEFAULT_BUDGET, sink: int = DEFAULT_SINK, local: int = DEFAULT_LOCAL,
                            scale: float | None = None, return_lse: bool = False, return_selection: bool = False):
    """One decode step of one layer, reading only the pages its queries need.

    Selects pages per KV head (:func:`select_pages`) and attends over them (:func:`decode_attention`:
    Triton on CUDA float16/bfloat16, PyTorch elsewhere). With ``budget >= n_keys`` it is exact dense
    decoding.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim]
        The step's queries after RoPE, float16/bfloat16 (float32/float64 on the PyTorch path).
    k_cache, v_cache : Tensor [batch, kv_heads, n_keys, head_dim]
        The layer's cache with the step's own key and value already appended; dtype and device of
        ``q``. Only the last dimension must be contiguous (a preallocated cache's view works).
    summaries : PageSummaries
        Of ``k_cache``, the step's key included (``summaries.append(new_key)`` after appending it).
    budget, sink, local : int
        Tokens per KV head (whole pages, forced ones included), always-kept first and last tokens.
    scale : float, optional
        ``1/sqrt(head_dim)`` when None.
    return_lse : bool
        Also return the natural log-sum-exp of each query head's kept logits.
    return_selection : bool
        Also return the :class:`PageSelection` (for :func:`recovery_ratio`, or to reuse it).

    Returns
    -------
    out : Tensor [batch, q_heads, 1, head_dim], dtype of ``q``
    lse : Tensor [batch, q_heads, 1], float32 (float64 for float64 inputs); with ``return_lse``
    selection : PageSelection; with ``return_selection``
    """
    for name, flag in (("return_lse", return_lse), ("return_selection", return_selection)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    if not isinstance(summaries, PageSummaries):
        raise TypeError(f"summaries must be a PageSummaries (from page_summaries), got {type(summaries).__name__}")
    _check_budget(budget, sink, local)
    _check_cache(q, k_cache, v_cache, ("k_cache", "v_cache"))
    if summaries.shape != tuple(k_cache.shape):
        raise ValueError(f"summaries cover [batch, kv_heads, n_keys, head_dim]={list(summaries.shape)}, k_cache has "
                         f"{list(k_cache.shape)}; call summaries.append(new_keys) whenever the cache grows")
    if summaries.device != k_cache.device:
        raise ValueError(f"summaries and k_cache must be on one device here, got summaries={summaries.device}, "
                         f"k_cache={k_cache.device}")
    scale = check_scale(scale, q.shape[-1])
    with torch.no_grad():
        selection = select_pages(q, summaries, budget=budget, sink=sink, local=local, scale=scale)
        result = decode_attention(q, k_cache, v_cache, selection, scale=scale, return_lse=return_lse)
    if not return_selection:
        return result
    return (*result, selection) if return_lse else (result, selection)


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Dense attention of one step, [batch, kv_heads, group, n_keys], float32 (float64 for float64 inputs)."""
    group = _check_cache(q, k, k)
    scale = check_scale(scale, q.shape[-1])
    dtype = _score_dtype(q.dtype)
    batch, kv_heads, n_keys, head_dim = k.shape
    logits = torch.matmul(q.to(dtype).reshape(batch, kv_heads, group, head_dim), k.to(dtype).transpose(-1, -2)) * scale
    return logits.softmax(dim=-1)


def page_attention_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, *, scale: float | None = None) -> torch.Tensor:
    """The dense attention mass of every page, summed over each KV head's group of query heads.

    What an oracle selection ranks by (``choose_pages(page_attention_mass(q, k, P), n_keys, P, ...)``
    keeps the pages of largest true mass): the bound on what any summary-based ranking can recover
    with one page set per KV head. Reads every key, so it is for measurements, not for decoding.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim]
    k : Tensor [batch, kv_heads, n_keys, head_dim]
    page_size : int

    Returns
    -------
    Tensor [batch, kv_heads, ceil(n_keys / page_size)], float32 (float64 for float64 inputs); each row
    sums to the group size.
    """
    _check_int(page_size, "page_size", 1)
    probabilities = _probabilities(q, k, scale).sum(dim=2)  # [batch, kv_heads, n_keys]
    padded = torch.nn.functional.pad(probabilities, (0, -k.shape[2] % page_size))
    return padded.unflatten(-1, (-1, page_size)).sum(dim=-1)


def recovery_ratio(q: torch.Tensor, k: torch.Tensor, selection: PageSelection, *, scale: float | None = None) -> torch.Tensor:
    """Share of each query head's dense attention that falls on the selected keys.

    ``sum_{j kept} softmax_j(scale * q . k_j)`` over all ``n_keys`` keys, in float32 (float64 for
    float64 inputs); 1 when every page is selected.

    Parameters
    ----------
    q : Tensor [batch, q_heads, 1, head_dim]
    k : Tensor [batch, kv_heads, n_keys, head_dim]
    selection : PageSelection

    Returns
    -------
    Tensor [batch, q_heads], float32 (float64 for float64 inputs).
    """
    _check_cache(q, k, k)
    _check_selection(selection, k)
    probabilities = _probabilities(q, k, scale)  # [batch, kv_heads, group, n_keys]
    kept = (probabilities * selection.kept_mask()[:, :, None]).sum(dim=-1)
    return kept.flatten(1, 2)
