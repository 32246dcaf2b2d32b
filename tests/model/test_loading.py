"""Loading and checking: bad files get one-line errors naming the file; opsets are reconciled."""

import onnx
import pytest
from onnx import helper

from conftest import conv_bn_model, make_model
from onnxmerge.api import load_tasks
from onnxmerge.errors import MergeError, UsageError
from onnxmerge.model.loading import load_model, opset_of, reconcile_versions


def test_not_onnx_and_truncated_and_missing(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    with pytest.raises(MergeError, match=r"notes.onnx: (not an ONNX model|invalid ONNX model)"):
        load_model(bad)
    good = conv_bn_model().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(MergeError, match=r"cut.onnx: (not an ONNX model|invalid ONNX model)"):
        load_model(cut)
    with pytest.raises(UsageError, match="nope.onnx: no such file"):
        load_model(tmp_path / "nope.onnx")


def test_any_operator_onnxruntime_runs_is_accepted(tmp_path):
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="ok"),
             helper.make_node("Erf", ["r"], ["e"], name="erf_1"),
             helper.make_node("Exp", ["e"], ["logits"], name="exp_2")]
    path = tmp_path / "odd.onnx"
    onnx.save(make_model(nodes, [], in_shape=("N", 4), out_shape=("N", 4)), str(path))
    assert [n.op_type for n in load_model(path).graph.node] == ["Relu", "Erf", "Exp"]


def test_foreign_domains_are_listed_with_their_nodes(tmp_path):
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="ok"),
             helper.make_node("Erf", ["r"], ["e"], name="erf_1", domain="com.example"),
             helper.make_node("Exp", ["e"], ["logits"], name="exp_2", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", 1, ["N", 4])],
                              [helper.make_tensor_value_info("logits", 1, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    with pytest.raises(MergeError) as e:
        load_model(path)
    assert str(e.value) == (f"{path}: operator(s) of a domain onnxruntime's CPU provider does not run: "
                            "com.example::Erf (erf_1), com.example::Exp (exp_2)")


def test_external_data_is_loaded(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), str(path), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    model = load_model(path)
    assert all(init.raw_data for init in model.graph.initializer)


def test_opsets_reconciled_to_highest(tmp_path):
    old = conv_bn_model()
    old.opset_import[0].version = 13
    new = conv_bn_model(seed=1)
    models, opset, ir = reconcile_versions({"old": old, "new": new})
    assert opset == 17 and all(opset_of(m) == 17 for m in models.values())
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(old, str(a))
    onnx.save(new, str(b))
    assert load_tasks([a, b]).opset == 17


def test_unconvertible_opset_names_blocking_operators():
    nodes = [helper.make_node("Clip", ["input"], ["logits"], name="clip6", min=0.0, max=6.0)]
    model = make_model(nodes, [], in_shape=("N", 4), out_shape=("N", 4), opset=6)
    with pytest.raises(MergeError, match=r"old: cannot convert from opset 6 to 3; blocking operators: Clip \(clip6\)"):
        reconcile_versions({"old": model}, target_opset=3)
