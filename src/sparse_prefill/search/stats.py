"""Dense attention of one layer folded into small blockwise sums, and what a kept set recovers of it.

Scoring a pattern by the dense attention mass it keeps needs the dense softmax, but never as an
``N x N`` matrix: query rows are formed a chunk at a time (only their causal keys) and folded into
sums whose size is that of the plan the GPU kernel walks:

- ``block_mass`` [heads, n_blocks, n_blocks]: mass of every 64 x 64 tile, what block diagonals and
  Block-Sparse tiles keep;
- ``offset_mass`` [heads, seq]: mass at each offset ``i - j``, what an A-shape window keeps;
- ``column_mass`` [heads, n_blocks, n_columns]: mass of each requested key column in each query
  block, what gathered Vertical-Slash columns keep outside their diagonal tiles;
- ``sink_tail`` [heads, n_locals, n_sinks]: mass of each of the first keys at offsets at or beyond
  each requested window, what A-shape sinks keep outside the window.

The last two are also kept for the last ``last_rows`` queries alone (the tiles and columns are per
query block already), so recall can be measured over every row or over the end of the prompt, where
a question is asked and an answer read: mean recall over all rows is mostly local attention, and a
head that retrieves from far back can lose what matters while keeping most of its mass.

From these, :func:`index_recall` gives any kept set's recall exactly as
``reference_attention(..., return_recall=True)`` defines it (mean over rows of the dense mass kept),
and :func:`index_cost` the pairs the GPU kernel computes for it, as ``SparsePlan.computed_pairs``
counts them. Positions and blocks follow docs/semantics.md; the length must be a multiple of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kinds import HeadIndex, index_unit
from ..kinds.common import BLOCK

# A pair in a gathered-column tile costs the kernel this many pairs of a whole tile (columns are
# counted as the 64-wide tiles the kernel multiplies, kinds.vertical_slash.column_tiles). Estimated
# from the frontier run of 2026-11-30 (docs/BENCHMARKS.md, H200, SmolLM2 at 128K): whole tiles ran
# at ~400 TF/s (Block-Sparse, Block-Coverage), Vertical-Slash (1000, 6096) at 344 TF/s with about a
# tenth of its pairs in column tiles, so those ran at ~150 TF/s: 2.6x. The tenth is estimated from
# the budget, not measured.
COLUMN_PAIR_COST = 2.6

__all__ = [
    "BLOCK",
    "COLUMN_PAIR_COST",
    "LayerStats",
    "layer_statistics",
    "index_recall",
    "index_cost",
    "causal_pairs",
]


def causal_pairs(seq: int) -> int:
    return seq * (seq + 1) // 2


@dataclass
class LayerStats:
    """Blockwise sums of one layer's dense causal attention (batch 1), float64.

    columns : long [heads, n_columns]  the key columns ``column_mass`` was gathered for
    locals : tuple of int  the windows ``sink_tail`` was summed beyond
    last_rows : int  how many final query rows ``offset_mass_last`` and ``sink_tail_last`` cover
    """

    seq: int
    block_mass: torch.Tensor
    offset_mass: torch.Tensor
    column_mass: torch.Tensor
    columns: torch.Tensor
    sink_tail: torch.Tensor
    locals: tuple[int, ...]
    last_rows: int
    offset_mass_last: torch.Tensor
    sink_tail_last: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return self.seq // BLOCK

    def rows(self, which: str) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """``(first query block, number of rows, offset mass, sink tail)`` of ``"all"`` or ``"last"`` rows."""
        if which == "all":
            return 0, self.seq, self.offset_mass, self.sink_tail
        if which == "last":
            return self.n_blocks - self.last_rows // BLOCK, self.last_rows, self.offset_mass_last, self.sink_tail_last
        raise ValueError(f"rows must be 'all' or 'last', got rows={which!r}")

    def diagonal_mass(self, first_block: int = 0) -> torch.Tensor:
        """[heads, n_blocks]: mass of each block diagonal ``d`` (tiles ``(m, m - d)``, ``m >= first_block``)."""
        nb = self.n_blocks
        m = torch.arange(first_block, nb, device=self.block_mass.device)
        key_block = m[:, None] - torch.arange(nb, device=m.device)[None, :]  # [query block, d]
        tiles = self.block_mass[:, first_block:].gather(2, key_block.clamp(min=0).expand(self.block_mass.shape[0], -1, -1))
        return (tiles * (key_block >= 0)).sum(dim=1)


def layer_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    columns: torch.Tensor,
    locals_: tuple[int, ...] = (),
    n_sinks: int = 64,
    chunk_elements: int | None = None,
    last_rows: int = 256,
) -> LayerStats:
    """Fold one layer's dense causal attention into :class:`LayerStats`.

    Parameters
    ----------
    q : [heads, seq, head_dim]; k : [kv_heads, seq, head_dim]
        One prompt (no batch dimension); ``heads`` a multiple of ``kv_heads``; ``seq`` a multiple of 64.
    columns : long [heads, n_columns]
        Key columns whose per-query-block mass is wanted (repeats allowed).
    locals_ : windows (tokens) for ``sink_tail``; n_sinks : how many first keys it covers.
    last_rows : the final queries whose own sums are kept too (a multiple of 64, clamped to ``seq``).
    chunk_elements : int, optional
        Attention probabilities formed at once (heads x rows x keys); by default ~2^26 on a CPU and
        2^28 on a GPU.
    """
    heads, seq, _ = q.shape
    if seq % BLOCK:
        raise ValueError(f"the search works on lengths that are a multiple of {BLOCK}, got seq={seq}")
    group = heads // k.shape[0]
    device = q.device
    nb = seq // BLOCK
    n_sinks = min(n_sinks, seq)
    if last_rows % BLOCK or last_rows < BLOCK:
        raise ValueError(f"last_rows must be a positive multiple of {BLOCK}, got last_rows={last_rows}")
    last_rows = min(last_rows, seq)
    if chunk_elements is None:
        chunk_elements = 2**28 if device.type == "cuda" else 2**26
    rows_per_chunk = max(BLOCK, chunk_elements // (heads * seq) // BLOCK * BLOCK)
    keys_full = k.float().repeat_interleave(group, dim=0)  # [heads, seq, dim]; small next to the scores
    f64 = dict(dtype=torch.float64, device=device)
    block_mass = torch.zeros(heads, nb, nb, **f64)
    offset_mass = torch.zeros(heads, seq, **f64)
    column_mass = torch.zeros(heads, nb, columns.shape[1], **f64)
    sink_tail = torch.zeros(heads, len(locals_), n_sinks, **f64)
    offset_mass_last = torch.zeros(heads, seq, **f64)
    sink_tail_last = torch.zeros(heads, len(locals_), n_sinks, **f64)
    key_positions = torch.arange(seq, device=device)
    for start in range(0, seq, rows_per_chunk):
        end = min(start + rows_per_chunk, seq)  # a multiple of 64: every chunk holds whole query blocks
        rows = key_positions[start:end]
        # Only keys <= end - 1 are causal for these rows: [heads, rows, end].
        logits = torch.einsum("hrd,hkd->hrk", q[:, start:end].float(), keys_full[:, :end]) * scale
        logits.masked_fill_(key_positions[None, :end] > rows[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        del logits
        n_rows = end - start
        block_mass[:, start // BLOCK : end // BLOCK, : end // BLOCK] += (
            probs.view(heads, n_rows // BLOCK, BLOCK, end // BLOCK, BLOCK).sum(dim=(2, 4), dtype=torch.float64)
        )
        # Offset o of row i is key i - o; offsets past the row hold 0 (their key index is clamped).
        offset_keys = rows[:, None] - key_positions[None, :end]  # [rows, offsets]
        by_offset = probs.gather(2, offset_keys.clamp(min=0).expand(heads, -1, -1)) * (offset_keys >= 0)
        offset_mass[:, :end] += by_offset.sum(dim=1, dtype=torch.float64)
        last = rows >= seq - last_rows  # [rows]
        if bool(last.any()):
            offset_mass_last[:, :end] += by_offset[:, last].sum(dim=1, dtype=torch.float64)
        del by_offset
        # Requested columns past the chunk's last row have no causal mass in it.
        picked = probs.gather(2, columns.clamp(max=end - 1)[:, None, :].expand(-1, n_rows, -1))
        picked = picked * (columns < end)[:, None, :]
        column_mass[:, start // BLOCK : end // BLOCK] += picked.view(heads, n_rows // BLOCK, BLOCK, -1).sum(
            dim=2, dtype=torch.float64
        )
        sinks = min(n_sinks, end)
        sink_offsets = rows[:, None] - key_positions[None, :sinks]  # [rows, sinks]
        for index, local in enumerate(locals_):
            beyond = probs[:, :, :sinks] * (sink_offsets >= local)
            sink_tail[:, index, :sinks] += beyond.sum(dim=1, dtype=torch.float64)
            if bool(last.any()):
                sink_tail_last[:, index, :sinks] += beyond[:, last].sum(dim=1, dtype=torch.float64)
        del probs
    return LayerStats(seq, block_mass, offset_mass, column_mass, columns, sink_tail, tuple(locals_), last_rows,
                      offset_mass_last, sink_tail_last)


def _check_one(index: HeadIndex) -> None:
    if hasattr(index, "batch"):  # indices without a batch dimension on every tensor say it
        one = index.batch == 1
    else:
        one = all(t.shape[0] == 1 for t in vars(index).values() if isinstance(t, torch.Tensor))
    if not one:
        raise ValueError("index_recall and index_cost take the index of one prompt (batch 1)")


def index_recall(index: HeadIndex, stats: LayerStats, head: int, rows: str = "all") -> float:
    """Recall of ``index`` (one prompt) for query head ``head``: dense mass on its kept set, mean over
    ``rows``: ``"all"`` query rows (``reference_attention``'s recall) or the ``"last"`` ones.
    Each kind computes it from the statistics (``kinds.<kind>.recall``)."""
    _check_one(index)
    return index_unit(index).recall(index, stats, head, rows)


def index_cost(index: HeadIndex, seq: int) -> tuple[int, int]:
    """``(tile_pairs, column_pairs)`` the GPU kernel computes for ``index`` (one prompt of ``seq`` tokens),
    as ``SparsePlan.computed_pairs`` counts them (``kinds.<kind>.computed_pairs``)."""
    _check_one(index)
    if seq % BLOCK:
        raise ValueError(f"the search works on lengths that are a multiple of {BLOCK}, got seq={seq}")
    tiles, columns = index_unit(index).computed_pairs(index, seq)
    return int(tiles[0]), int(columns[0])
