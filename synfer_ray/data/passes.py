"""Passes over the manifest: the first pass makes ``count`` rows; top-up passes add rows for the
classes still short of their accepted-count target, until every class has it or the budget ends.

A pass is a range of new manifest indices after every earlier one, with the classes its rows
ask for (``quotas``: each class a consecutive block of rows). A top-up pass is planned from the
acceptance of the finished passes only, and recorded before any of its shards is made, so a
rerun after an interruption makes exactly the rows an uninterrupted run makes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

TOP_UP_MARGIN = 1.15  # ask for 15% more than the acceptance seen so far predicts
MIN_YIELD = 0.02  # a class never accepted yet is planned as if 1 in 50 rows were


@dataclass(frozen=True)
class Pass:
    index: int
    start: int
    count: int
    rows_per_shard: int
    quotas: tuple[tuple[str, int], ...] = ()  # () for the first pass: classes from the config's mix

    def as_json(self) -> dict:
        return {**asdict(self), "quotas": [list(q) for q in self.quotas]}

    @classmethod
    def from_json(cls, raw: Mapping) -> "Pass":
        return cls(index=int(raw["index"]), start=int(raw["start"]), count=int(raw["count"]),
                   rows_per_shard=int(raw["rows_per_shard"]), quotas=tuple((str(c), int(n)) for c, n in raw["quotas"]))


def quota_target(quotas: Sequence[tuple[str, int]], offset: int) -> str:
    """The class of the pass's row ``offset``: the quotas' classes in consecutive blocks."""
    for name, count in quotas:
        if offset < count:
            return name
        offset -= count
    raise IndexError(f"row {offset} is past the pass's quotas {list(quotas)}")


def shortfall(wanted: Mapping[str, int], accepted: Mapping[str, int]) -> dict[str, int]:
    """Accepted rows still missing per class (only classes that miss some)."""
    return {c: n - accepted.get(c, 0) for c, n in wanted.items() if accepted.get(c, 0) < n}


def plan_top_up(previous: Sequence[Pass], wanted: Mapping[str, int], made_by_target: Mapping[str, int],
                accepted: Mapping[str, int], budget_left: int,
                rows_per_shard: Callable[[int], int]) -> Pass | None:
    """The next pass, or None when no class is short or no budget is left.

    Each short class gets ``missing / yield * margin`` rows, where its yield is the accepted rows
    labelled with it per row that asked for it so far; the pass is scaled down to the budget."""
    missing = shortfall(wanted, accepted)
    if not missing or budget_left <= 0:
        return None
    asks = {}
    for name, need in missing.items():
        made = made_by_target.get(name, 0)
        rate = accepted.get(name, 0) / made if made else 1.0
        asks[name] = max(1, math.ceil(need / max(rate, MIN_YIELD) * TOP_UP_MARGIN))
    total = sum(asks.values())
    if total > budget_left:
        scale = budget_left / total
        asks = {name: math.floor(n * scale) for name, n in asks.items()}
        asks = {name: n for name, n in asks.items() if n > 0}
        if not asks:
            return None
    last, count = previous[-1], sum(asks.values())
    return Pass(index=last.index + 1, start=last.start + last.count, count=count,
                rows_per_shard=rows_per_shard(count),
                quotas=tuple(sorted(asks.items(), key=lambda item: list(wanted).index(item[0]))))
