"""Adding a method is one package under passes/ and one line in passes/__init__.py.

A tiny demonstration method (not shipped) is written here as such a package, in a temporary folder
on `onnxmerge.passes.__path__`: `dedupe` computes weights that are bit-identical in several tasks
once (its only pass rewires every task to the first task's tensor). Registering it is the one line
of passes/__init__.py (`METHODS[...] = ...`, done with monkeypatch); nothing else in onnxmerge
changes, and the command line, `onnxmerge methods`, the API's pipeline, --verify and the metadata
all take it. A real method adds, besides: its tests, and its row in the README's method table.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import numpy as np
import onnx
import pytest

import onnxmerge.passes
from conftest import EXAMPLES, shipped
from onnxmerge.api import merge
from onnxmerge.cli import main
from onnxmerge.measure.metrics import count_parameters
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import session

PACKAGE = {
    "__init__.py": '''
        """`dedupe`: weights bit-identical in several tasks are stored and computed on once."""

        from onnxmerge.passes import common
        from onnxmerge.passes.dedupe.share_equal_weights import ShareEqualWeightsPass
        from onnxmerge.pipeline.method import Method, Option, positive

        METHOD = Method(
            name="dedupe",
            paper="none: a demonstration",
            summary="weights bit-identical in several tasks are stored once",
            build=lambda p: common.pipeline(combined=[ShareEqualWeightsPass(p["min_size"])]),
            exact=True,
            options={"min_size": Option(1, "share only weights of at least this many elements",
                                        parse=positive("min-size"))},
        )
    ''',
    "share_equal_weights.py": '''
        """ShareEqualWeightsPass: a weight equal, bit for bit, to another task's is replaced by it."""

        import onnx_graphsurgeon as gs

        from onnxmerge.pipeline.manager import Pass, PassResult


        class ShareEqualWeightsPass(Pass):
            exact = True

            def __init__(self, min_size: int = 1):
                self.min_size = min_size

            def call(self, state) -> PassResult:
                first: dict = {}
                modified = False
                for node in state.graph.nodes:
                    for i, t in enumerate(node.inputs):
                        if not isinstance(t, gs.Constant) or t.values.size < self.min_size:
                            continue
                        key = (t.values.dtype.str, t.values.shape, t.values.tobytes())
                        kept = first.setdefault(key, t)
                        if kept is not t:
                            node.inputs[i] = kept
                            modified = True
                state.graph.cleanup()
                return PassResult(state, modified)
    ''',
}


@pytest.fixture
def dedupe(tmp_path, monkeypatch):
    folder = tmp_path / "passes" / "dedupe"
    folder.mkdir(parents=True)
    for name, text in PACKAGE.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.setattr(onnxmerge.passes, "__path__", [*onnxmerge.passes.__path__, str(folder.parent)])
    module = importlib.import_module("onnxmerge.passes.dedupe")
    monkeypatch.setitem(onnxmerge.passes.METHODS, "dedupe", module.METHOD)  # the one line of passes/__init__.py
    yield module
    for name in [m for m in sys.modules if m.startswith("onnxmerge.passes.dedupe")]:
        del sys.modules[name]


def test_a_new_method_package_runs_from_the_command_line(dedupe, tmp_path, capsys):
    model = shipped(EXAMPLES / "fashion_lenet.onnx")
    out = tmp_path / "deduped.onnx"
    assert main(["methods"]) == 0
    assert "dedupe: weights bit-identical" in capsys.readouterr().out
    # the same model twice: every weight is shared, so the file holds one copy of each
    code = main([str(model), str(model), "-o", str(out), "--method", "dedupe", "--min-size", "2",
                 "--names", "a,b", "--verify", "--no-latency", "-q"])
    assert code == 0, capsys.readouterr().err
    merged = onnx.load(str(out))
    info = read_metadata(merged)
    assert info.method == "dedupe" and info.params == {"min_size": 2}
    # side by side with the same normalisation (BatchNorm folded) and nothing shared
    side_by_side = merge([model, model], method="zipper", params={"share": 0}, names=["a", "b"]).model
    assert count_parameters(merged) * 2 == count_parameters(side_by_side) > 0
    original = onnx.load(str(model))
    # and both tasks still compute the original's outputs
    x = np.random.default_rng(0).standard_normal((3, *[d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim[1:]])).astype(np.float32)
    want = session(original).run(None, {original.graph.input[0].name: x})[0]
    sess = session(merged)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    out_name = original.graph.output[0].name
    for task in ("a", "b"):
        np.testing.assert_allclose(got[f"{task}/{out_name}"], want, rtol=1e-5, atol=1e-6)


def test_a_new_method_s_flags_are_checked(dedupe, tmp_path, capsys):
    model = shipped(EXAMPLES / "fashion_lenet.onnx")
    code = main([str(model), str(model), "-o", str(tmp_path / "m.onnx"), "--method", "dedupe", "--min-size", "0"])
    assert code == 2 and "--min-size 0: give a whole number of at least 1" in capsys.readouterr().err
