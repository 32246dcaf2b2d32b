"""Graphs written the old way (IR 3, opset 9, fixed batch 1, initializers as inputs, weights made by
constant subgraphs, LRN and Sum) load, merge exactly, and are refused in one line where their batch
cannot be freed. The reference is onnxruntime running the file itself, one sample at a time."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.api import load_tasks, merge
from onnxmerge.errors import MergeError
from onnxmerge.graph.layers import layer_view
from onnxmerge.model.loading import as_loaded, load_model, opset_of
from onnxmerge.model.upgrade import MIN_OPSET
from onnxmerge.passes.common import normalise_passes
from onnxmerge.pipeline.manager import PassManager


def old_model(seed: int, flatten_axis0: bool = False) -> onnx.ModelProto:
    """input [1,3,8,8] -> Conv (its weight: Reshape of a Constant) -> Relu -> LRN -> MaxPool -> Sum
    -> Reshape [1,-1] -> Gemm -> Softmax; IR 3, opset 9, every initializer also a graph input."""
    r = np.random.default_rng(seed)
    arr = lambda *s: (r.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "w1_shape"),
             numpy_helper.from_array(arr(4), "b1"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
             numpy_helper.from_array(arr(5, 64), "w2"), numpy_helper.from_array(arr(5), "b2")]
    nodes = [helper.make_node("Constant", [], ["w1_flat"], value=numpy_helper.from_array(arr(108), "w1_flat")),
             helper.make_node("Reshape", ["w1_flat", "w1_shape"], ["w1"]),
             helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("LRN", ["r1"], ["l1"], size=3, alpha=1e-2, beta=0.75, bias=1.0),
             helper.make_node("MaxPool", ["l1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sum", ["p1", "p1", "l1_pool_again"], ["s1"]),
             helper.make_node("MaxPool", ["r1"], ["l1_pool_again"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["s1"], ["f"], axis=0) if flatten_axis0 else
             helper.make_node("Reshape", ["s1", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y0"], transB=1),
             helper.make_node("Softmax", ["y0"], ["y"])]
    nodes.insert(6, nodes.pop(7))  # the second MaxPool before the Sum that reads it
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def old_pair(tmp_path):
    paths = [tmp_path / f"old{k}.onnx" for k in range(2)]
    for k, p in enumerate(paths):
        onnx.save(old_model(k), str(p))
    return paths


def per_sample(path, x: np.ndarray) -> np.ndarray:
    """The file run by onnxruntime at its own fixed batch of 1, sample by sample."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def test_old_graph_is_brought_to_the_current_form(old_pair):
    notes = []
    model = load_model(old_pair[0], notes)
    assert opset_of(model) == MIN_OPSET and model.ir_version >= 7
    assert [i.name for i in model.graph.input] == ["x"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert any("5 initializer(s) listed as graph inputs" in n for n in notes)
    assert any("converted from opset 9 to 13" in n for n in notes)
    assert any("fixed batch dim 1 made symbolic" in n for n in notes)
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], per_sample(old_pair[0], x), rtol=1e-5, atol=1e-6)


def test_constant_subgraph_weight_is_a_layer(old_pair):
    state = PassManager(normalise_passes()).run(load_tasks(old_pair[:1]))
    layers = layer_view(state.tasks[0].graph)
    assert [(l.kind, l.in_channels, l.out_channels) for l in layers] == [("conv", 3, 4), ("fc", 64, 5)]


def test_pack_of_old_graphs_equals_the_files(old_pair, tmp_path):
    out = tmp_path / "merged.onnx"
    result = merge(old_pair, out, method="pack")
    assert any("made symbolic" in n for n in result.info.fidelity["notes"])
    x = np.random.default_rng(6).standard_normal((4, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})
    for k, path in enumerate(old_pair):
        np.testing.assert_allclose(got[k], per_sample(path, x), rtol=1e-5, atol=1e-6)


def test_an_original_written_the_old_way_is_run_as_loaded(old_pair):
    loaded = as_loaded(old_pair[0])
    assert isinstance(loaded, onnx.ModelProto) and opset_of(loaded) == MIN_OPSET
    current = old_pair[0].with_name("current.onnx")
    onnx.save(loaded, str(current))
    assert as_loaded(current) == str(current)


def test_a_batch_that_cannot_be_freed_is_refused_in_one_line(tmp_path):
    path = tmp_path / "flat0.onnx"
    onnx.save(old_model(0, flatten_axis0=True), str(path))  # Flatten(axis=0) folds the batch into the features
    with pytest.raises(MergeError) as e:
        load_model(path)
    text = str(e.value)
    assert text.startswith(f"{path}: the graph is written for a fixed batch of 1") and "\n" not in text


def test_an_extra_opset_import_does_not_stop_the_conversion(tmp_path):
    """fuzz seed 29 case 1001: an opset_import of another domain at a version onnx does not know
    made the IR version lookup raise ValueError."""
    model = old_model(0)
    model.opset_import.add(domain="com.example", version=99)
    path = tmp_path / "extra.onnx"
    onnx.save(model, str(path))
    assert opset_of(load_model(path)) == MIN_OPSET
