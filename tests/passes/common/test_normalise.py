"""Normalisation passes: state the model before and after, check exactness, run twice."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from conftest import conv_bn_model, init, make_model
from onnxmerge.api import load_tasks
from onnxmerge.model.runtime import random_feeds, session
from onnxmerge.passes.common import normalise_passes
from onnxmerge.passes.common.fold_batchnorm import FoldBatchNormPass
from onnxmerge.passes.common.remove_identity import RemoveIdentityPass
from onnxmerge.pipeline.checks import check_exact, check_invariants, task_model
from onnxmerge.pipeline.manager import PassManager
from onnxmerge.pipeline.state import MergeState, Task


def state_of(model: onnx.ModelProto) -> MergeState:
    return MergeState(tasks=[Task("t", model, gs.import_onnx(model))], opset=17, ir_version=model.ir_version)


def ops(state: MergeState) -> list[str]:
    return [n.op for n in state.tasks[0].graph.nodes]


def test_normalise_folds_batchnorm_and_drops_pass_throughs_exactly():
    state = state_of(conv_bn_model())
    assert ops(state) == ["Conv", "BatchNormalization", "Relu", "MaxPool", "Flatten", "Gemm",
                          "BatchNormalization", "Dropout", "Identity"]
    PassManager(normalise_passes(), verify=True).run(state)
    assert ops(state) == ["Conv", "Relu", "MaxPool", "Flatten", "Gemm"]
    # the graph output keeps its name: the Gemm now writes it
    assert [t.name for t in state.tasks[0].graph.outputs] == ["logits"]
    check_exact(state)
    check_invariants(state)


def test_normalise_twice_changes_nothing():
    state = state_of(conv_bn_model())
    PassManager(normalise_passes()).run(state)
    for p in normalise_passes():
        assert p.call(state).modified is False, p.name


def test_batchnorm_fold_matches_numpy_formula():
    model = conv_bn_model(with_dropout=False)
    state = state_of(model)
    FoldBatchNormPass().call(state)
    conv = state.tasks[0].graph.nodes[0]
    w = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    s = w["g1"] / np.sqrt(w["v1"] + 1e-3)
    np.testing.assert_allclose(conv.inputs[1].values, w["w1"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(conv.inputs[2].values, s * (w["b1"] - w["m1"]) + w["be1"], rtol=1e-5, atol=1e-6)


def test_batchnorm_fold_declines_when_weight_is_shared():
    """Weights shared on purpose must not be rescaled for one consumer (STYLE.md, onnxscript)."""
    model = conv_bn_model(with_dropout=False)
    # a second Conv reads w1 too, and its output is added to the first branch
    model.graph.node.insert(1, helper.make_node("Conv", ["input", "w1"], ["c1b"], name="conv_shared", pads=[1, 1, 1, 1]))
    model.graph.node[2].input[0] = "c1sum"
    model.graph.node.insert(2, helper.make_node("Add", ["c1", "c1b"], ["c1sum"], name="add"))
    onnx.checker.check_model(model)
    state = state_of(model)
    FoldBatchNormPass().call(state)
    assert ops(state).count("BatchNormalization") == 1  # only the Gemm's BN folded
    assert any("bn1 kept" in n for n in state.notes)
    check_exact(state)


def test_batchnorm_fold_declines_when_conv_output_used_twice():
    model = conv_bn_model(with_dropout=False)
    model.graph.node[2].input[0] = "sum"
    model.graph.node.insert(2, helper.make_node("Add", ["n1", "c1"], ["sum"], name="add"))
    state = state_of(model)
    FoldBatchNormPass().call(state)
    assert "bn1" in [n.name for n in state.tasks[0].graph.nodes]
    assert any("also used elsewhere" in n for n in state.notes)
    check_exact(state)


def test_identity_between_graph_input_and_output_is_kept():
    model = make_model([helper.make_node("Identity", ["input"], ["logits"], name="id")], [],
                       in_shape=("N", 4), out_shape=("N", 4))
    state = state_of(model)
    assert RemoveIdentityPass().call(state).modified is False
    assert ops(state) == ["Identity"]


def test_matmul_add_gemm_model_reproduced(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["logits"], name="add")]
    model = make_model(nodes, [init("w", rng.standard_normal((64, 4))), init("b", rng.standard_normal(4))])
    path = tmp_path / "mm.onnx"
    onnx.save(model, str(path))
    state = PassManager(normalise_passes(), verify=True).run(load_tasks([path]))
    feeds = random_feeds(session(model), batch=3)
    got = session(task_model(state.tasks[0], state)).run(None, feeds)[0]
    ref = session(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
