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


def as_fast(a: Trial, b: Trial) -> bool:
    """Whether `a` is as fast as `b` within what the measurement can tell apart: a's median speed-up is
    at least b's, or the quartiles of their per-round speed-ups overlap (two models of the same work
    differ by noise alone, and which looks faster changes from run to run)."""
    if (a.speedup or 1.0) >= (b.speedup or 1.0):
        return True
    qa, qb = a.speedup_quartiles, b.speedup_quartiles
    return qa is not None and qb is not None and qa[1] >= qb[0]


def beats(a: Trial, b: Trial, objective: str) -> bool:
    """Whether `a` can replace `b` as the best model on `objective`: smaller; or, for latency, faster,
    or as fast (as_fast both ways: a tie within the noise) and smaller."""
    if objective == "size":
        return cost(a, objective) < cost(b, objective)
    tie = as_fast(a, b) and as_fast(b, a)
    return cost(a, objective) < cost(b, objective) and not tie or tie and (a.bytes or 0) < (b.bytes or 0)


def choose(trials: list[Trial], max_loss: float, objective: str) -> Trial:
    """The trial within the budget with the lowest cost; among equals, the smaller loss. For latency,
    the models as fast as the fastest within the noise (as_fast) count as equals, and the smallest of
    them is taken. The baseline (pack, exact) is always within the budget, so there is always a choice."""
    within = [t for t in trials if t.within(max_loss)]
    if objective == "latency":
        fastest = min(within, key=lambda t: (cost(t, objective), t.worst_loss))
        within = [t for t in within if as_fast(t, fastest)]
        return min(within, key=lambda t: (t.bytes or 0, t.worst_loss, cost(t, objective)))
    return min(within, key=lambda t: (cost(t, objective), t.worst_loss))
