"""Allocation across tables: pure Python over (bytes, cost) pairs, deterministic.

Each table has options `(bytes, cost)`, where cost is the table's share of the model's squared
error (`W_t * e_t^2`, so that the model's error is `sqrt(sum(cost) / sum(W_t))`). The search:

1. Per table, the Pareto frontier (fewer bytes or less cost; dominated options dropped) and its
   lower convex hull.
2. The model's frontier: from every table at its cheapest option, repeatedly take the hull step
   (one table, one option up) with the largest cost decrease per byte. The points visited are the
   lower convex hull of every combination (a Lagrangian sweep: each is optimal for its slope).
3. For a budget (or an error target), walk that path while it fits (skipping steps that do not
   fit), then improve locally over the full Pareto frontiers: the best single-table change, then
   the best change of two tables at once, until neither improves. The same local search also
   starts from every uniform setting that fits; the best result wins (ties: fewer bytes, then
   the first found). So the plan is never worse than the best uniform setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[int, float]
"""An option of one table: (bytes, cost)."""

_MAX_ROUNDS = 200
_PAIR_LIMIT = 4_000_000  # option pairs examined per round at most (then single moves only)


@dataclass(frozen=True)
class Step:
    """One point of the model's frontier: each table's option index, total bytes and cost."""

    choice: tuple[int, ...]
    bytes: int
    cost: float


def pareto(points: Sequence[Point]) -> list[int]:
    """Returns the indices of the non-dominated points, by bytes ascending (cost descending).

    Among equal points the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    kept: list[int] = []
    for index in order:
        if not kept or points[index][1] < points[kept[-1]][1]:
            kept.append(index)
    return kept


def lower_hull(points: Sequence[Point], frontier: Sequence[int]) -> list[int]:
    """Returns the frontier's points on its lower convex hull (bytes ascending)."""
    hull: list[int] = []
    for index in frontier:
        while len(hull) >= 2:
            (b0, c0), (b1, c1), (b2, c2) = points[hull[-2]], points[hull[-1]], points[index]
            # drop the middle point when it lies on or above the line from first to last
            if (c1 - c0) * (b2 - b0) >= (c2 - c0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def _may_beat(key, size: int, cost: float, best: tuple) -> bool:  # type: ignore[no-untyped-def]
    """Whether a choice of these totals (summed in another order, so off by float rounding) may
    have a key below `best`: a cheap filter before the exact `key` of the choice."""
    slack = 1e-9 * (abs(cost) + 1.0)
    kind = key.kind
    if kind == "cost":  # key (cost, size)
        return cost - slack <= best[0]
    return size <= best[0]  # key (size, cost)


class Allocator:
    """The options of every table, their frontiers, and the searches over them."""

    def __init__(self, tables: Sequence[Sequence[Point]]) -> None:
        self.tables = [list(points) for points in tables]
        self.frontiers = [pareto(points) for points in self.tables]
        self.hulls = [lower_hull(p, f) for p, f in zip(self.tables, self.frontiers, strict=True)]

    def totals(self, choice: Sequence[int]) -> tuple[int, float]:
        """Returns the total bytes and cost of one option index per table."""
        size = sum(self.tables[t][i][0] for t, i in enumerate(choice))
        cost = sum(self.tables[t][i][1] for t, i in enumerate(choice))
        return size, cost

    def cheapest(self) -> tuple[int, ...]:
        """Returns each table's option of fewest bytes (least cost among those)."""
        return tuple(frontier[0] for frontier in self.frontiers)

    def most_accurate(self) -> tuple[int, ...]:
        """Returns each table's option of least cost (fewest bytes among those)."""
        return tuple(frontier[-1] for frontier in self.frontiers)

    def path(self) -> list[Step]:
        """Returns the model's frontier: the greedy hull walk from cheapest to most accurate."""
        position = [0] * len(self.tables)
        choice = [hull[0] for hull in self.hulls]
        size, cost = self.totals(choice)
        steps = [Step(tuple(choice), size, cost)]
        while True:
            best = None
            for t, hull in enumerate(self.hulls):
                if position[t] + 1 < len(hull):
                    (b0, c0), (b1, c1) = (
                        self.tables[t][hull[position[t]]],
                        self.tables[t][hull[position[t] + 1]],
                    )
                    slope = (c0 - c1) / max(1, b1 - b0)
                    if best is None or slope > best[0]:
                        best = (slope, t)
            if best is None:
                return steps
            t = best[1]
            old = self.tables[t][choice[t]]
            position[t] += 1
            choice[t] = self.hulls[t][position[t]]
            new = self.tables[t][choice[t]]
            size += new[0] - old[0]
            cost += new[1] - old[1]
            steps.append(Step(tuple(choice), size, cost))

    def for_budget(
        self, budget: int, seeds: Sequence[Sequence[int]] = ()
    ) -> tuple[int, ...] | None:
        """Returns the least-cost choice with total bytes <= budget (None: none fits)."""
        if self.totals(self.cheapest())[0] > budget:
            return None
        start = list(self.cheapest())
        size, _ = self.totals(start)
        position = [0] * len(self.tables)
        blocked = [False] * len(self.tables)
        while True:
            best = None
            for t, hull in enumerate(self.hulls):
                if blocked[t] or position[t] + 1 >= len(hull):
                    continue
                (b0, c0), (b1, c1) = (
                    self.tables[t][hull[position[t]]],
                    self.tables[t][hull[position[t] + 1]],
                )
                slope = (c0 - c1) / max(1, b1 - b0)
                if best is None or slope > best[0]:
                    best = (slope, t, b1 - b0)
            if best is None:
                break
            _, t, extra = best
            if size + extra > budget:
                blocked[t] = True
                continue
            position[t] += 1
            start[t] = self.hulls[t][position[t]]
            size += extra
        candidates = [tuple(start)] + [tuple(seed) for seed in seeds]

        def key(choice: Sequence[int]) -> tuple[float, int]:
            size, cost = self.totals(choice)
            return cost, size

        key.kind = "cost"  # type: ignore[attr-defined]

        return self._best(candidates, key, lambda size, cost: size <= budget)

    def for_cost(
        self, max_cost: float, seeds: Sequence[Sequence[int]] = ()
    ) -> tuple[int, ...] | None:
        """Returns the fewest-bytes choice with total cost <= max_cost (None: unreachable)."""
        if self.totals(self.most_accurate())[1] > max_cost:
            return None
        start = None
        for step in self.path():
            if step.cost <= max_cost:
                start = step.choice
                break
        candidates = [start if start is not None else self.most_accurate()]
        candidates += [tuple(seed) for seed in seeds]

        def key(choice: Sequence[int]) -> tuple[float, float]:
            size, cost = self.totals(choice)
            return size, cost

        key.kind = "size"  # type: ignore[attr-defined]

        return self._best(candidates, key, lambda size, cost: cost <= max_cost)

    def _best(self, starts, key, fits) -> tuple[int, ...] | None:  # type: ignore[no-untyped-def]
        best = None
        for start in starts:
            if not fits(*self.totals(start)):
                continue
            improved = self._improve(list(start), key, fits)
            if best is None or key(improved) < key(best):
                best = improved
        return best

    def _improve(self, choice: list[int], key, fits) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
        """Returns `choice` after the best single and pair changes, while they improve `key`."""
        for _ in range(_MAX_ROUNDS):
            current = key(choice)
            size, cost = self.totals(choice)
            best = None
            for t, frontier in enumerate(self.frontiers):
                old = self.tables[t][choice[t]]
                for option in frontier:
                    if option == choice[t]:
                        continue
                    new = self.tables[t][option]
                    size1, cost1 = size - old[0] + new[0], cost - old[1] + new[1]
                    if not _may_beat(key, size1, cost1, (best or current)[0:2]):
                        continue
                    trial = choice.copy()
                    trial[t] = option
                    if fits(*self.totals(trial)) and key(trial) < (best or current)[0:2]:
                        best = (*key(trial), trial)
            if best is None and self._pairs_affordable():
                best = self._best_pair(choice, key, fits, current)
            if best is None:
                return tuple(choice)
            choice = best[2]
        return tuple(choice)

    def _pairs_affordable(self) -> bool:
        sizes = [len(f) for f in self.frontiers]
        total = sum(sizes)
        return sum(s * (total - s) for s in sizes) // 2 <= _PAIR_LIMIT

    def _best_pair(self, choice, key, fits, current):  # type: ignore[no-untyped-def]
        size, cost = self.totals(choice)
        best = None
        best_key = current
        for t1 in range(len(self.tables)):
            old1 = self.tables[t1][choice[t1]]
            for o1 in self.frontiers[t1]:
                if o1 == choice[t1]:
                    continue
                p1 = self.tables[t1][o1]
                size1, cost1 = size - old1[0] + p1[0], cost - old1[1] + p1[1]
                for t2 in range(t1 + 1, len(self.tables)):
                    old2 = self.tables[t2][choice[t2]]
                    o2 = self._best_partner(t2, size1 - old2[0], cost1 - old2[1], key, fits)
                    if o2 is not None and o2 != choice[t2]:
                        p2 = self.tables[t2][o2]
                        size2, cost2 = size1 - old2[0] + p2[0], cost1 - old2[1] + p2[1]
                        if not _may_beat(key, size2, cost2, best_key):
                            continue
                        trial = choice.copy()
                        trial[t1], trial[t2] = o1, o2
                        trial_key = key(trial)
                        if trial_key < best_key:
                            best, best_key = trial, trial_key
        return None if best is None else (*best_key, best)

    def _best_partner(self, t, size, cost, key, fits) -> int | None:  # type: ignore[no-untyped-def]
        """Returns table t's frontier option that, added to the other tables' totals (size,
        cost), fits and has the least key, or None where none fits. Along a frontier bytes rise
        and cost falls, so the options that fit a budget are a prefix (the least cost is its
        last) and those that meet a cost target a suffix (the fewest bytes is its first): a
        binary search instead of trying every option."""
        frontier = self.frontiers[t]
        points = self.tables[t]
        lo, hi = 0, len(frontier)
        if key.kind == "cost":  # fits by bytes: find the end of the fitting prefix
            while lo < hi:
                mid = (lo + hi) // 2
                p = points[frontier[mid]]
                if fits(size + p[0], cost + p[1]):
                    lo = mid + 1
                else:
                    hi = mid
            return frontier[lo - 1] if lo > 0 else None
        while lo < hi:  # fits by cost: find the start of the fitting suffix
            mid = (lo + hi) // 2
            p = points[frontier[mid]]
            if fits(size + p[0], cost + p[1]):
                hi = mid
            else:
                lo = mid + 1
        return frontier[lo] if lo < len(frontier) else None
