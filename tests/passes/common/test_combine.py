"""Combining graphs (the pack method): names, shared inputs, metadata, exactness."""

import numpy as np
import onnx
import pytest

from conftest import conv_bn_model
from onnxmerge.api import merge
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import random_feeds, session


def run(model, feeds):
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_pack_two_models_shared_input_reproduces_both(tiny_pair, tmp_path):
    out = tmp_path / "merged.onnx"
    result = merge(tiny_pair, out, method="pack", verify_passes=True)
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["tiny0/logits", "tiny1/logits"]
    feeds = random_feeds(session(model), batch=5, seed=3)
    got = run(model, feeds)
    for k, path in enumerate(tiny_pair):
        ref = run(onnx.load(str(path)), feeds)["logits"]
        np.testing.assert_allclose(got[f"tiny{k}/logits"], ref, rtol=1e-5, atol=1e-5)
    info = read_metadata(model)
    assert info.method == "pack" and [t.name for t in info.tasks] == ["tiny0", "tiny1"]
    assert info.tasks[1].outputs == {"logits": "tiny1/logits"} and info.tasks[1].inputs == {"input": "input"}
    assert all(d <= 1e-5 for d in info.fidelity["max_rel_diff_random_inputs"].values())
    assert result.info == info
    # every name of the merged graph is unique and prefixed by its task (but the shared input)
    names = [n.name for n in model.graph.node] + [i.name for i in model.graph.initializer]
    assert len(set(names)) == len(names)
    assert all(n.startswith(("tiny0/", "tiny1/")) for n in names)


def test_pack_separate_inputs_and_three_models(tmp_path):
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"m{k}.onnx")
        onnx.save(conv_bn_model(seed=10 + k, channels=2 + k), str(paths[-1]))
    model = merge(paths, names=["x", "y", "z"], separate_inputs=True).model
    assert [i.name for i in model.graph.input] == ["x/input", "y/input", "z/input"]
    feeds = random_feeds(session(model), batch=3)
    got = run(model, feeds)
    for name, path in zip("xyz", paths):
        ref = run(onnx.load(str(path)), {"input": feeds[f"{name}/input"]})["logits"]
        np.testing.assert_allclose(got[f"{name}/logits"], ref, rtol=1e-5, atol=1e-5)


def test_different_input_shapes_get_separate_inputs(tmp_path):
    from onnx import helper

    from conftest import make_model

    a = tmp_path / "a.onnx"
    onnx.save(conv_bn_model(), str(a))
    b = tmp_path / "b.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["input"], ["logits"], name="r")], [],
                         in_shape=("N", 4), out_shape=("N", 4)), str(b))
    model = merge([a, b]).model
    assert [i.name for i in model.graph.input] == ["a/input", "b/input"]


def test_user_alignment_is_checked(tiny_pair):
    from onnxmerge.graph.alignment import AlignmentError

    assert merge(tiny_pair, align="0=0").info.fidelity["alignment"][0]["pairs"] == [[0, 0]]
    with pytest.raises(AlignmentError, match="pairs a conv layer"):
        merge(tiny_pair, align="0=1")


def test_dump_dir_writes_models_after_changing_passes(tiny_pair, tmp_path):
    merge(tiny_pair, method="zipper", params={"share": 0}, dump_dir=tmp_path / "dump")
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert "02_FoldBatchNormPass_tiny0.onnx" in dumped
    assert [n for n in dumped if n.endswith("_CombineGraphsPass.onnx")] != []  # numbered after the per-task passes
    assert not any("AlignLayersPass" in n for n in dumped)  # analysis only: nothing changed
    for p in (tmp_path / "dump").iterdir():
        onnx.checker.check_model(str(p))
