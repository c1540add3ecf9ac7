"""Per-row kernels over a causal square, launched in ranges of rows by width.

Several index kernels run one program per query block ``m`` over that row's causal key blocks
``0 .. m`` (Block-Coverage's tile masses, threshold and list writing; Block-Sparse's selection),
with a vector of ``BLOCK_C`` key blocks, a compile-time width. One width for every row makes the
early rows mostly masked lanes; :func:`row_ranges` gives each range of rows the narrowest width
that holds its longest row.
"""

from __future__ import annotations

import triton

# Key blocks a program holds at a time: a row up to 2048 blocks (128K tokens) is one chunk.
MAX_CHUNK = 2048
# The narrowest chunk the per-row kernels get a launch of their own for.
SMALLEST_CHUNK = 256


def row_ranges(first_block: int, n_rows: int) -> list[tuple[int, int, int]]:
    """The rows of the per-row kernels as launches ``(first_row, end_row, chunk)``: query block
    ``m`` reads key blocks ``0 .. m``, so the early rows get a narrower chunk than the last. One
    launch with the widest chunk for every row spent half its vector work on masked lanes at 128K
    (2048 rows); doubling widths from ``SMALLEST_CHUNK`` cut that work by a third, at three more launches
    per kernel."""
    ranges, row = [], 0
    while row < n_rows:
        widest = max(triton.next_power_of_2(first_block + n_rows), 16)  # the last row's key blocks
        chunk = min(max(triton.next_power_of_2(first_block + row + 1), SMALLEST_CHUNK), widest, MAX_CHUNK)
        # Rows whose key blocks 0 .. m fit the chunk; past MAX_CHUNK one chunk walks the rest.
        end = n_rows if chunk == MAX_CHUNK else min(n_rows, chunk - first_block)
        ranges.append((row, end, chunk))
        row = end
    return ranges
