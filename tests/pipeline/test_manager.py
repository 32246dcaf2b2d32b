"""The pass manager checks each pass's declared preconditions (`requires`) and results (`ensures`)."""

import pytest

from conftest import EXAMPLES, shipped
from onnxmerge.api import load_tasks
from onnxmerge.errors import MergeError
from onnxmerge.passes import METHODS
from onnxmerge.passes.common import AlignLayersPass, CleanupGraphPass, CombineGraphsPass, normalise_passes
from onnxmerge.passes.zipper.zip_layers import ZipLayersPass
from onnxmerge.pipeline.manager import CONDITIONS, Pass, PassManager, PassResult
from onnxmerge.pipeline.method import split_pipeline

PAIR = [shipped(EXAMPLES / "fashion_lenet.onnx"), shipped(EXAMPLES / "digits_lenet.onnx")]


def test_a_pass_before_its_precondition_is_refused_naming_it():
    with pytest.raises(MergeError, match=r"pass ZipLayersPass requires aligned, combined \(after FoldConstantsPass"):
        PassManager([*normalise_passes(), ZipLayersPass(1)]).run(load_tasks(PAIR))
    with pytest.raises(MergeError, match=r"pass AlignLayersPass requires separate \(after .*CombineGraphsPass\)"):
        PassManager([AlignLayersPass(), CombineGraphsPass(), AlignLayersPass()]).run(load_tasks(PAIR))
    with pytest.raises(MergeError, match=r"pass CleanupGraphPass requires combined"):
        PassManager([CleanupGraphPass()]).run(load_tasks(PAIR))


def test_a_pass_that_breaks_its_promise_is_caught():
    class ForgetsToCombine(Pass):
        ensures = ("combined",)

        def call(self, state):
            return PassResult(state, False)

    with pytest.raises(MergeError, match="pass ForgetsToCombine ensures combined"):
        PassManager([ForgetsToCombine()]).run(load_tasks(PAIR))


@pytest.mark.parametrize("name, params", [*((n, {}) for n in sorted(METHODS)), ("codebook", {"emit": "native"}),
                                          ("zipper", {"match": "hungarian"})])
def test_every_declared_pipeline_orders_its_passes_by_their_conditions(name, params):
    """Read statically: each pass's requirements are ensured by a pass before it (or, for
    `exported`, by the CALIBRATE step), and none needs the separate graphs after combining."""
    before, after = split_pipeline(METHODS[name].pipeline(params))
    assert after or params.get("emit") != "native"
    held = {"separate"}
    for p in before:
        assert set(p.requires) <= held, f"{name}: {p.name} requires {p.requires}, held {held}"
        held |= set(p.ensures)
        if "combined" in p.ensures:
            held.discard("separate")
    held |= {"exported"}
    for p in after:
        assert set(p.requires) <= held, f"{name}: {p.name} requires {p.requires}"
    assert set(CONDITIONS) >= {c for p in before + after for c in (*p.requires, *p.ensures)}
