"""Share one cost budget among all heads: each head gets the candidate that buys the most recall.

Every head offers candidates as (cost, recall) points; maximising the total recall under a total
cost is a multiple-choice knapsack. Two solvers, and the better of their answers is kept:

- greedy on each head's upper concave hull: start every head at its cheapest point, then take the
  upgrade (the next hull point of some head) with the most recall per unit of cost while it fits.
  Near-optimal with many heads, but one expensive steep step can block a better pair of steps;
- dynamic programming over the budget cut into ``units`` steps, costs rounded to the nearest step,
  then checked against the exact costs (and the budget tightened if rounding overshot).

Heads whose recall rises steeply with budget get more of it; heads that a cheap pattern already
serves stay cheap.
"""

from __future__ import annotations

import heapq

import torch

__all__ = ["BudgetTooSmall", "upper_hull", "allocate"]


class BudgetTooSmall(ValueError):
    """The budget is below what the cheapest candidate of every head costs together."""


def upper_hull(cost: list[float], recall: list[float]) -> list[int]:
    """Indices of the points on the upper concave hull, by increasing cost.

    Starts at the cheapest point (the best recall among equally cheap ones); a point is kept only
    if it adds recall and its slope from the previous hull point exceeds the next one's.
    """
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -recall[i], i))
    hull: list[int] = []
    for i in order:
        if hull and recall[i] <= recall[hull[-1]]:
            continue  # costs at least as much and recovers no more
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b when the step a -> i is at least as steep as a -> b (b lies under the chord).
            if (recall[b] - recall[a]) * (cost[i] - cost[a]) <= (recall[i] - recall[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _greedy(recall_rows: list[list[float]], cost_rows: list[list[float]], budget: float) -> list[int]:
    hulls = [upper_hull(c, r) for c, r in zip(cost_rows, recall_rows)]
    position = [0] * len(hulls)
    total = sum(cost_rows[h][hull[0]] for h, hull in enumerate(hulls))
    upgrades: list[tuple[float, int]] = []

    def push(head: int) -> None:
        hull, p = hulls[head], position[head]
        if p + 1 < len(hull):
            a, b = hull[p], hull[p + 1]
            slope = (recall_rows[head][b] - recall_rows[head][a]) / (cost_rows[head][b] - cost_rows[head][a])
            heapq.heappush(upgrades, (-slope, head))

    for head in range(len(hulls)):
        push(head)
    while upgrades:
        _, head = heapq.heappop(upgrades)
        hull, p = hulls[head], position[head]
        step = cost_rows[head][hull[p + 1]] - cost_rows[head][hull[p]]
        if total + step <= budget * (1 + 1e-9):
            total += step
            position[head] = p + 1
            push(head)
        # Otherwise this head stays: its later upgrades all need this one first.
    return [hull[p] for hull, p in zip(hulls, position)]


def _dynamic(recall: torch.Tensor, cost: torch.Tensor, budget: float, units: int) -> torch.Tensor:
    """Best total recall with the rounded costs summing to at most ``units`` steps of ``budget / units``."""
    n_heads, n_candidates = recall.shape
    weight = torch.round(cost / (budget / units)).long().clamp(min=0)  # [heads, candidates]
    steps = torch.arange(units + 1)
    best = torch.zeros(units + 1, dtype=torch.float64)  # best total recall of the heads so far within b steps
    choice = torch.empty(n_heads, units + 1, dtype=torch.long)
    for head in range(n_heads):
        before = steps[None, :] - weight[head][:, None]  # [candidates, b]: budget left for the earlier heads
        totals = torch.where(before >= 0, best[before.clamp(min=0)] + recall[head][:, None], float("-inf"))
        best, choice[head] = totals.max(dim=0)
    picks = torch.empty(n_heads, dtype=torch.long)
    b = units
    for head in reversed(range(n_heads)):
        picks[head] = choice[head, b]
        b -= int(weight[head, picks[head]])
    return picks


def allocate(recall: torch.Tensor, cost: torch.Tensor, budget: float, units: int = 8192) -> torch.Tensor:
    """Pick one candidate per head, maximising total recall with total cost at most ``budget``.

    Parameters
    ----------
    recall, cost : Tensor [n_heads, n_candidates]
        Mean recall and mean cost of every candidate of every head (any consistent cost unit).
    budget : float
        Total cost allowed, in the unit of ``cost``.
    units : int
        Budget resolution of the dynamic program.

    Returns
    -------
    long Tensor [n_heads]: the chosen candidate of each head.
    """
    if recall.shape != cost.shape or recall.dim() != 2:
        raise ValueError(f"recall and cost must both be [n_heads, n_candidates], got {tuple(recall.shape)} and {tuple(cost.shape)}")
    recall, cost = recall.double().cpu(), cost.double().cpu()
    cheapest = float(cost.min(dim=1).values.sum())
    if cheapest > budget * (1 + 1e-9):
        raise BudgetTooSmall(
            f"the budget {budget:.6g} is below {cheapest:.6g}, what the cheapest candidate of every head costs together"
        )
    picks = [torch.tensor(_greedy(recall.tolist(), cost.tolist(), budget), dtype=torch.long)]
    limit = budget
    for _ in range(8):  # rounding can overshoot the exact budget a little: tighten and retry
        candidate = _dynamic(recall, cost, limit, units)
        overshoot = float(cost.gather(1, candidate[:, None]).sum()) - budget
        if overshoot <= budget * 1e-9:
            picks.append(candidate)
            break
        limit -= overshoot
        if limit <= 0:
            break
    return max(picks, key=lambda p: float(recall.gather(1, p[:, None]).sum()))
