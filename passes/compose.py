"""Compositions: one method shares what it shares, a second compresses what the first leaves per task.

Issue 18's compositions: zipper shares the first K layers of same-architecture models, or mtz the
chosen neurons of every layer (their work is done once: latency), then codebooks compress every
layer, shared or per task (size).

`then(first, second)` is a Method whose pipeline is the first's up to its clean-up, the second's
passes on the combined graph, one calibration of the whole merged model at the end, then the
second's after-calibration passes and the first's (mtz's FuseRunsPass then fuses each zipped
layer whose runs' weights the portable codebook form gathers, and leaves native EConv / EFC runs as
they are). The second method sees the graph the first left: a layer the
first shared is one node, or (mtz) one node of its shared neurons beside per-task nodes of the
others; ShareCodebooksPass gives a shared node a codebook of its own. Its options are both methods' (their names do not overlap: checked). The budgeted search runs a
composition on the first method's best setting within the budget (`Method.composes`), bisecting the
second's knob.
"""

from __future__ import annotations

from typing import Any

from onnxmerge.passes.common.cleanup import CleanupGraphPass
from onnxmerge.passes.common.combine_graphs import CombineGraphsPass
from onnxmerge.pipeline.method import CALIBRATE, Knob, Method


def then(first: Method, second: Method) -> Method:
    """The composition `first` then `second` (see the module docstring)."""
    clash = set(first.options) & set(second.options)
    if clash:
        raise ValueError(f"then({first.name}, {second.name}): both take {', '.join(sorted(clash))}")

    def build(p: dict[str, Any]) -> list:
        a = first.build({k: p[k] for k in first.options})
        b = second.build({k: p[k] for k in second.options})
        a_clean, a_cal = _index(a, CleanupGraphPass), a.index(CALIBRATE)
        b_combine, b_clean, b_cal = _index(b, CombineGraphsPass), _index(b, CleanupGraphPass), b.index(CALIBRATE)
        if [type(s) for s in b[:b_combine]] != [type(s) for s in a[:len(b[:b_combine])]]:
            raise ValueError(f"then(..., {second.name}): {second.name} rewrites the task graphs before they are "
                             "combined; a composition runs only its passes on the combined graph")
        return [*a[:a_clean], *b[b_combine + 1:b_clean], *a[a_clean:a_cal + 1], *b[b_cal + 1:], *a[a_cal + 1:]]

    return Method(
        name=f"{first.name}+{second.name}",
        paper=f"{first.paper}; then {second.paper}",
        summary=f"{first.name} shares what it shares, then {second.name} compresses the layers that stay per task",
        build=build,
        options={**first.options, **second.options},
        conflicts=first.conflicts + second.conflicts,
        search=Knob(second.search.ladder, f"{second.search.describe}, on {first.name}'s best setting",
                    saves=tuple(dict.fromkeys(first.search.saves + second.search.saves))),
        composes=(first.name, second.name),
        warm=first.warm,  # the first's passes load the warm start; the second's run on what they leave
        one_input=first.one_input or second.one_input,
    )


def _index(steps: list, kind: type) -> int:
    return next(i for i, s in enumerate(steps) if isinstance(s, kind))
