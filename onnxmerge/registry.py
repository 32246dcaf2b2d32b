"""The method registry: each merging method is one entry (mergekit's habit).

An entry has the method's CLI name, its paper, a one-line summary, its default parameters and a
function that builds its passes (which run on the combined graph) from the parameters. The CLI's
`--method` choices, `onnxmerge methods` and the README's table come from here, so adding a method
touches this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from onnxmerge.errors import UsageError
from onnxmerge.pass_manager import Pass


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    summary: str
    build: Callable[[dict[str, Any]], list[Pass]]
    defaults: dict[str, Any] = field(default_factory=dict)
    exact: bool = False  # whether the method reproduces the originals to float rounding

    def passes(self, params: dict[str, Any]) -> list[Pass]:
        return self.build(self.parameters(params))

    def parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise UsageError(f"method {self.name} takes no parameter(s) {', '.join(sorted(unknown))}")
        return {**self.defaults, **params}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name == "auto":
        return pick_auto()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r} (known: auto, {', '.join(METHODS)})") from None


def pick_auto() -> Method:
    """`--method auto`: the best registered method. Only `pack` exists so far."""
    return METHODS["pack"]


register(Method(
    name="pack",
    paper="none: the baseline that later methods are measured against (as onnx.compose.merge_models, side by side)",
    summary="all models in one graph and one session, sharing nothing but the input",
    build=lambda params: [],
    exact=True,
))
