"""The trade-off the search reports: Pareto fronts of accuracy loss against size and against latency,
and the choice of one model within the budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxmerge.search.trial import Trial


def cost(trial: Trial, objective: str) -> float:
    """What the objective minimises: stored bytes, or latency as the inverse of the speed-up over the
    originals (a trial without a latency measurement counts as no faster than them)."""
    if objective == "size":
        return float(trial.bytes)
    return 1.0 / trial.speedup if trial.speedup else 1.0


def pareto(trials: list[Trial], objective: str) -> list[Trial]:
    """The measured trials that no other beats on both the worst task's loss and the objective's cost
    (ties on both: the first one), in order of cost."""
    measured = [t for t in trials if t.measured]
    front = []
    for t in measured:
        dominated = any((cost(o, objective) <= cost(t, objective) and o.worst_loss <= t.worst_loss)
                        and (cost(o, objective) < cost(t, objective) or o.worst_loss < t.worst_loss
                             or measured.index(o) < measured.index(t))
                        for o in measured if o is not t)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: cost(t, objective))


def choose(trials: list[Trial], max_loss: float, objective: str) -> Trial:
    """The trial within the budget with the lowest cost; among equals, the smaller loss. The baseline
    (pack, exact) is always within the budget, so there is always a choice."""
    within = [t for t in trials if t.within(max_loss)]
    return min(within, key=lambda t: (cost(t, objective), t.worst_loss))
