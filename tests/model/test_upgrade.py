"""Graphs written the old way (IR 3, opset 9, fixed batch 1, initializers as inputs, weights made by
constant subgraphs, LRN and Sum) load and merge exactly. Where their batch cannot be freed, they keep
it and the merge runs at it: every check, the calibration, evaluation and latency. The reference is
onnxruntime running the file itself, at its own batch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.api import load_tasks, merge
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.cli import main
from onnxmerge.data import Dataset
from onnxmerge.errors import MergeError
from onnxmerge.graph.layers import layer_view
from onnxmerge.measure.evaluate import evaluate
from onnxmerge.measure.latency import latency_table
from onnxmerge.model.contract import read_metadata
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


def test_an_old_graph_whose_batch_cannot_be_freed_keeps_it(tmp_path):
    """Flatten(axis=0) folds the batch into the features: the graph is converted up and keeps batch 1."""
    path = tmp_path / "flat0.onnx"
    onnx.save(old_model(0, flatten_axis0=True), str(path))
    notes = []
    model = load_model(path, notes)
    assert opset_of(model) == MIN_OPSET and model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    kept = [n for n in notes if "fixed at 1" in n]
    assert len(kept) == 1 and kept[0].startswith("flat0.onnx: the batch dim is fixed at 1 and cannot be made symbolic (")
    assert kept[0].endswith("): the merge runs at batch 1") and "it does not run at batch 2: node" in kept[0]
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], per_sample(path, x), rtol=1e-5, atol=1e-6)


def fixed_model(seed: int, batch: int | None) -> onnx.ModelProto:
    """x [batch,3,8,8] -> Conv -> Relu -> MaxPool -> (flatten) -> Gemm -> y [batch,5], opset 17, where
    the flatten fixes the batch so that it cannot be freed: batch 1, a Reshape to [-1] then an
    Unsqueeze (the batch folded into the features); batch 2, a Reshape to [2, 64] (which loading
    would free) and an Add of a [2, 64] constant (a batch-sized constant that is not a Reshape
    target). batch None: a Flatten(axis=1) and a symbolic batch, the same function per sample."""
    r = np.random.default_rng(seed)
    arr = lambda *s: (r.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(arr(4, 3, 3, 3), "w1"), numpy_helper.from_array(arr(4), "b1"),
             numpy_helper.from_array(arr(5, 64), "w2"), numpy_helper.from_array(arr(5), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
    if batch is None:
        nodes.append(helper.make_node("Flatten", ["p1"], ["f"], axis=1, name="flatten"))
    elif batch == 1:
        inits += [numpy_helper.from_array(np.array([-1], np.int64), "all"),
                  numpy_helper.from_array(np.array([0], np.int64), "axis0")]
        nodes += [helper.make_node("Reshape", ["p1", "all"], ["flat"], name="flatten_all"),
                  helper.make_node("Unsqueeze", ["flat", "axis0"], ["f"], name="unsqueeze")]
    else:
        inits += [numpy_helper.from_array(np.array([batch, 64], np.int64), "rows"),
                  numpy_helper.from_array(arr(batch, 64), "offset")]
        nodes += [helper.make_node("Reshape", ["p1", "rows"], ["flat"], name="flatten"),
                  helper.make_node("Add", ["flat", "offset"], ["f"], name="add_offset")]
    nodes.append(helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"))
    dim = "N" if batch is None else batch
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def fixed_files(tmp_path, batch: int | None, count: int = 2, tag: str = "") -> list:
    paths = [tmp_path / f"{tag or ('free' if batch is None else f'fixed{batch}')}_{k}.onnx" for k in range(count)]
    for k, p in enumerate(paths):
        onnx.save(fixed_model(k, batch), str(p))
    return paths


def at_batch(path, x: np.ndarray, batch: int) -> np.ndarray:
    """The file run by onnxruntime on `x` in batches of `batch`."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def merged_outputs(model, x: np.ndarray, batch: int) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [sess.run(None, {sess.get_inputs()[0].name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


@pytest.mark.parametrize("batch", [1, 2])
def test_a_batch_that_cannot_be_freed_is_merged_at_it(tmp_path, batch):
    """Refused before (fixed batch 1 folded into the features; fixed batch 2 added to a [2, 64]
    constant): now pack merges them at that batch, exactly, and the report's notes say so."""
    paths = fixed_files(tmp_path, batch)
    result = merge(paths, tmp_path / "merged.onnx", method="pack")
    assert [i.type.tensor_type.shape.dim[0].dim_value for i in result.model.graph.input] == [batch]
    notes = result.info.fidelity["notes"]
    for p in paths:
        assert any(n.startswith(f"{p.name}: the batch dim is fixed at {batch} and cannot be made symbolic (")
                   and n.endswith(f"the merge runs at batch {batch}") for n in notes), notes
    assert result.info.fidelity["output_check"]["batch"] == batch
    assert max(result.info.fidelity["max_rel_diff_random_inputs"].values()) <= 1e-5
    x = np.random.default_rng(7).standard_normal((3 * batch, 3, 8, 8)).astype(np.float32)
    got = merged_outputs(onnx.load(str(tmp_path / "merged.onnx")), x, batch)
    for k, p in enumerate(paths):
        np.testing.assert_allclose(got[k], at_batch(p, x, batch), rtol=1e-5, atol=1e-6)


def test_a_sharing_method_merges_fixed_batch_graphs(tmp_path):
    """zipper --share 0 (channel matching, nothing shared) on two graphs fixed at batch 1 reproduces them."""
    paths = fixed_files(tmp_path, 1)
    result = merge(paths, tmp_path / "zipped.onnx", method="zipper", params={"share": 0})
    assert max(result.info.fidelity["max_rel_diff_random_inputs"].values()) <= 1e-5
    x = np.random.default_rng(8).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = merged_outputs(result.model, x, 1)
    for k, p in enumerate(paths):
        np.testing.assert_allclose(got[k], at_batch(p, x, 1), rtol=1e-5, atol=1e-6)


def test_calibration_evaluation_and_latency_run_at_the_fixed_batch(tmp_path):
    """A merge fixed at batch 2 calibrates in batches of 2 (whatever --batch-size says), and the merged
    file evaluates (5 samples: the last batch filled up) and is timed at batch 2 only."""
    paths = fixed_files(tmp_path, 2)
    rng = np.random.default_rng(9)
    data = {p.stem: Dataset(rng.standard_normal((5, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 5), p.name, {})
            for p in paths}
    out = tmp_path / "calibrated.onnx"
    result = merge(paths, out, method="pack", calib=data, calibration=CalibrationConfig(steps=2, batch_size=64))
    assert result.info.params["calibration"]["batch_size"] == 2 and result.info.params["calibration"]["steps"] == 2
    info = read_metadata(onnx.load(str(out)))
    scores = evaluate(out, info, data, {p.stem: str(p) for p in paths}, progress=False)
    for p in paths:
        assert scores[p.stem]["n"] == 5 and 0.0 <= scores[p.stem]["agreement"] <= 1.0
    rows = latency_table(out, [str(p) for p in paths], batch_sizes=(1, 32), threads=(1,), budget_s=0.0,
                         min_rounds=2, max_rounds=2, warmup=0, progress=False)
    assert [r["batch"] for r in rows] == [2]


def test_mtz_measures_held_out_accuracy_at_the_fixed_batch(tmp_path):
    """mtz --tolerance runs the originals and the zipped network on the held-out samples (a fifth of
    --calib: 3 of 15, two batches of 2, the last filled up) at the fixed batch."""
    paths = fixed_files(tmp_path, 2)
    rng = np.random.default_rng(12)
    calib = {p.stem: Dataset(rng.standard_normal((15, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 15), p.name, {})
             for p in paths}
    result = merge(paths, tmp_path / "mtz.onnx", method="mtz", params={"tolerance": 5}, calib=calib)
    assert [i.type.tensor_type.shape.dim[0].dim_value for i in result.model.graph.input] == [2]


def test_a_free_model_runs_at_the_fixed_batch_of_the_other(tmp_path):
    """One model fixed at batch 1, one free: the merge runs at batch 1, their inputs still shared."""
    fixed, free = fixed_files(tmp_path, 1, 1)[0], fixed_files(tmp_path, None, 1)[0]
    result = merge([fixed, free], tmp_path / "mixed.onnx", method="pack")
    assert [i.type.tensor_type.shape.dim[0].dim_value for i in result.model.graph.input] == [1]
    assert f"{free.name}: run at batch 1, the fixed batch of {fixed.name}" in result.info.fidelity["notes"]
    x = np.random.default_rng(10).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = merged_outputs(result.model, x, 1)
    np.testing.assert_allclose(got[0], at_batch(fixed, x, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], at_batch(free, x, 2), rtol=1e-5, atol=1e-6)


def test_two_different_fixed_batches_are_refused_in_one_line(tmp_path):
    one, two = fixed_files(tmp_path, 1, 1)[0], fixed_files(tmp_path, 2, 1)[0]
    with pytest.raises(MergeError) as e:
        merge([one, two], method="pack")
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{two}: the batch dim is fixed at 2, and at 1 in {one}")


def test_cli_merges_and_reports_a_fixed_batch(tmp_path, capsys):
    """The command line: the merge at batch 1, its report (notes, latency at batch 1, evaluation)
    and `eval` of the merged file."""
    paths = fixed_files(tmp_path, 1)
    rng = np.random.default_rng(11)
    data = []
    for p in paths:
        np.savez(tmp_path / f"{p.stem}.npz", x=rng.standard_normal((3, 3, 8, 8)).astype(np.float32),
                 y=rng.integers(0, 5, 3))
        data += ["--data", f"{p.stem}={tmp_path / f'{p.stem}.npz'}"]
    out, report = tmp_path / "merged.onnx", tmp_path / "report.json"
    assert main([*map(str, paths), "-o", str(out), "--method", "pack", "--report", str(report), "--quiet",
                 "--latency-budget", "0", *data]) == 0
    text = capsys.readouterr().out
    assert f"{paths[0].name}: the batch dim is fixed at 1 and cannot be made symbolic" in text
    written = json.loads(report.read_text())
    assert {r["batch"] for r in written["latency"]["rows"]} == {1}
    assert all(written["evaluation"][p.stem]["agreement"] == 1.0 for p in paths)
    assert main(["eval", str(out), "--quiet", "--no-latency", *data]) == 0
    assert "agree" in capsys.readouterr().out.lower()


def test_an_extra_opset_import_does_not_stop_the_conversion(tmp_path):
    """fuzz seed 29 case 1001: an opset_import of another domain at a version onnx does not know
    made the IR version lookup raise ValueError."""
    model = old_model(0)
    model.opset_import.add(domain="com.example", version=99)
    path = tmp_path / "extra.onnx"
    onnx.save(model, str(path))
    assert opset_of(load_model(path)) == MIN_OPSET
