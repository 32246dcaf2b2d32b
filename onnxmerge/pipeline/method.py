"""The `Method` entry: a merging method's name, paper, parameters and its whole pipeline (mergekit's habit).

Each method declares itself in its own package under passes/ (`passes/<name>/__init__.py`, its
`METHOD`), and `passes/__init__.py` lists them. The CLI's `--method` choices and flags, `onnxmerge
methods` and the README's table come from these entries; the API runs the declared pipeline and
names no method.

A pipeline is one list: the passes before calibration (normalisation, alignment, the method's
rewrites, combining, cleanup), the `CALIBRATE` marker where the merged model is calibrated against
the originals when data is given, and the method's after-calibration passes (which rewrite the
exported model, `MergeState.model`, such as the codebook's native emission).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx_graphsurgeon as gs

from onnxmerge.errors import UsageError
from onnxmerge.graph.layers import Layer
from onnxmerge.pipeline.manager import Pass


class Calibrate:
    """The place in a pipeline where the API calibrates the merged model (when calibration data is
    given): the passes before it rewrite the combined graph, those after it the exported model."""

    def __repr__(self) -> str:
        return "CALIBRATE"


CALIBRATE = Calibrate()


@dataclass(frozen=True)
class Option:
    """A method parameter; the CLI flag `--<name with dashes>` is generated from it."""

    default: Any
    help: str
    choices: tuple | None = None
    parse: Callable[[str], Any] = str


@dataclass(frozen=True)
class Knob:
    """The settings that the budgeted search (onnxmerge.search) tries for a method, from the least to
    the most aggressive: along the ladder the merged model gets smaller (or faster) and its accuracy
    falls or stays, so the search can bisect it for the most aggressive setting within the budget.
    `ladder(n)` lists the parameter sets for models of `n` aligned layers."""

    ladder: Callable[[int], list[dict[str, Any]]]
    describe: str  # what the ladder walks, for the search's log and report
    # what the ladder saves, most first ("size", "latency"): the search tries first the methods whose
    # strength is its objective, so that the others' settings that cannot beat them are not calibrated
    saves: tuple[str, ...] = ("size", "latency")


@dataclass(frozen=True)
class Method:
    """One merging method: `build(params)` returns its whole pipeline (a list of passes with the
    `CALIBRATE` marker in it)."""

    name: str
    paper: str
    summary: str
    build: Callable[[dict[str, Any]], list[Pass | Calibrate]]
    options: dict[str, Option] = field(default_factory=dict)
    exact: bool = False  # whether the method reproduces the originals to float rounding
    single: bool = False  # whether it also works on one model alone (compressing it)
    rewrites_layers: bool = True  # whether it edits weight-bearing layers (a model without any is refused)
    extends_merged: bool = False  # whether a model it merged, given first, takes further tasks
    sweep: str | None = None  # the layer-count parameter that a progressive sweep (--sweep) walks
    # whether a merge can start from the weights of an earlier merged model of the same tasks
    # (api.merge's warm_start, read by its LoadWeightsPass): a sweep's previous step, or the
    # calibrated model a composition's first method found
    warm: bool = False
    validation: str | None = None  # the parameter whose choices are measured on --validation data
    # pairs of parameters that contradict each other (one would be silently ignored), with why
    conflicts: tuple[tuple[str, str, str], ...] = ()
    # what the method does with each layer of a model (its normalised graph and layer view) at its
    # defaults, one phrase per layer (`onnxmerge inspect`); None: it leaves every layer as it is
    explain: Callable[[gs.Graph, list[Layer]], list[str]] | None = None
    search: Knob | None = None  # what `--max-loss` searches; None: the method is not searched
    # a composition of two registered methods (passes/compose.py): the search bisects its knob on the
    # first method's best setting within the budget, after the first was searched
    composes: tuple[str, str] | None = None
    # whether it shares computation on the tasks' one input (MergeState.shared_input): its passes
    # refuse models whose inputs differ, and the search does not try it on them
    one_input: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def pipeline(self, params: dict[str, Any]) -> list[Pass | Calibrate]:
        """The declared pipeline for `params` (checked and completed with the defaults)."""
        steps = self.build(self.parameters(params))
        if sum(s is CALIBRATE for s in steps) != 1:
            raise ValueError(f"method {self.name}: its pipeline must hold the CALIBRATE marker once")
        return steps

    def parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` checked against the options (unknown names, choices, contradictions), with the
        defaults filled in."""
        unknown = set(params) - set(self.options)
        if unknown:
            raise UsageError(f"method {self.name} takes no parameter(s) {', '.join(sorted(unknown))}")
        for k, v in params.items():
            choices = self.options[k].choices
            if choices and v not in choices:
                raise UsageError(f"--{k.replace('_', '-')} {v}: choose from {', '.join(map(str, choices))}")
        for a, b, why in self.conflicts:  # set = given and not the default (params may hold the defaults)
            if all(params.get(k, self.options[k].default) != self.options[k].default for k in (a, b)):
                raise UsageError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} contradict each other: {why}")
        return {**self.defaults, **params}


def split_pipeline(steps: list[Pass | Calibrate]) -> tuple[list[Pass], list[Pass]]:
    """(the passes before calibration, the passes after it)."""
    k = steps.index(CALIBRATE)
    return list(steps[:k]), list(steps[k + 1:])


# parsers of option values, each refusing a bad value in one line that names the flag

def positive(flag: str) -> Callable[[str], int]:
    """A whole number >= 1."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise UsageError(f"--{flag} {text}: give a whole number of at least 1")
        return value
    return parse


def count(flag: str) -> Callable[[str], int]:
    """A whole number >= 0."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise UsageError(f"--{flag} {text}: give a whole number of at least 0")
        return value
    return parse


def number(flag: str, what: str = "a number") -> Callable[[str], float]:
    """Any float."""
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--{flag} {text}: give {what}") from None
    return parse
