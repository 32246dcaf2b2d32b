"""The merging methods, one package each; this list is the registry (a new method is one package
under passes/ and one line here). `common` holds the passes every method's pipeline shares."""

from __future__ import annotations

from onnxmerge.errors import UsageError
from onnxmerge.passes import codebook, mtz, pack, zipper
from onnxmerge.passes.compose import then
from onnxmerge.pipeline.method import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    pack.METHOD,
    zipper.METHOD,
    codebook.METHOD,
    mtz.METHOD,
    then(zipper.METHOD, codebook.METHOD),  # shared layers computed once, codebooks for the rest
    then(mtz.METHOD, codebook.METHOD),  # shared neurons computed once, codebooks for them and the rest
)}

BASELINE = pack.METHOD.name  # shares nothing: the reference every other method's speed is measured against


def get_method(name: str) -> Method:
    """The method called `name`; `auto` picks one (`pick_auto`)."""
    if name == "auto":
        return pick_auto()
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r} (known: auto, {', '.join(METHODS)})") from None


def pick_auto() -> Method:
    """`--method auto`: the baseline, which shares nothing; the sharing methods trade accuracy for
    size and speed, so they are chosen explicitly."""
    return METHODS[BASELINE]
