"""Evaluation of a hand-built 2-task merged model against numpy and against its originals."""

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.errors import MergeError
from onnxmerge.graph.ops import make_session
from onnxmerge.measure.evaluate import evaluate, run_original, run_task
from onnxmerge.model.contract import MergedInfo, TaskInfo, read_metadata, write_metadata

RNG = np.random.default_rng(0)
SHAPES = {"a": (1, 4, 4), "b": (2, 3, 3)}
CLASSES = {"a": 3, "b": 5}
WEIGHTS = {t: (RNG.standard_normal((int(np.prod(s)), CLASSES[t])).astype(np.float32),
               RNG.standard_normal(CLASSES[t]).astype(np.float32)) for t, s in SHAPES.items()}
# the merged model's task b is the original b with perturbed weights, so that it disagrees sometimes
PERTURBED = {"a": WEIGHTS["a"],
             "b": (WEIGHTS["b"][0] + 0.3 * RNG.standard_normal(WEIGHTS["b"][0].shape).astype(np.float32),
                   WEIGHTS["b"][1])}


def linear_nodes(prefix, x, out, weights):
    w, b = weights
    nodes = [helper.make_node("Flatten", [x], [prefix + "flat"]),
             helper.make_node("Gemm", [prefix + "flat", prefix + "w", prefix + "b"], [out])]
    return nodes, [numpy_helper.from_array(w, prefix + "w"), numpy_helper.from_array(b, prefix + "b")]


def model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def original(task):
    nodes, inits = linear_nodes("", "x", "logits", WEIGHTS[task])
    return model(nodes, [vi("x", ["N", *SHAPES[task]])], [vi("logits", ["N", CLASSES[task]])], inits)


def merged(shared_input=False):
    """Tasks a and b side by side: outputs a/logits, b/logits; inputs a/x, b/x (or one shared x)."""
    nodes, inits, inputs, tasks = [], [], [], []
    for t in "ab":
        x = "x" if shared_input else f"{t}/x"
        n, i = linear_nodes(f"{t}/", x, f"{t}/logits", PERTURBED[t])
        nodes += n
        inits += i
        if not inputs or not shared_input:
            inputs.append(vi(x, ["N", *SHAPES[t]]))
        tasks.append(TaskInfo(name=t, source=f"{t}.onnx", sha256="0" * 64, inputs={"x": x},
                              outputs={"logits": f"{t}/logits"}))
    m = model(nodes, inputs, [vi(f"{t}/logits", ["N", CLASSES[t]]) for t in "ab"], inits)
    write_metadata(m, MergedInfo(version="test", method="pack", params={}, tasks=tasks))
    return m


def numpy_logits(x, weights):
    return x.reshape(len(x), -1) @ weights[0] + weights[1]


def dataset(task, n, labels=True, source=None):
    x = RNG.standard_normal((n, *SHAPES[task])).astype(np.float32)
    y = RNG.integers(0, CLASSES[task], n).astype(np.int64) if labels else None
    return SimpleNamespace(x=x, y=y, source=source or f"{task}_test.npz")


def test_run_task_feeds_zeros_to_the_other_task_and_batches():
    m = merged()
    info = read_metadata(m)
    s = make_session(m, 1)
    x = dataset("b", 10).x
    out = run_task(s, info.task("b"), x, batch_size=3)
    np.testing.assert_allclose(out, numpy_logits(x, PERTURBED["b"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, run_task(s, info.task("b"), x, batch_size=256))


def test_run_original():
    x = dataset("a", 7).x
    out = run_original(make_session(original("a"), 1), x, batch_size=2)
    np.testing.assert_allclose(out, numpy_logits(x, WEIGHTS["a"]), rtol=1e-5, atol=1e-5)


def test_evaluate_against_numpy():
    m = merged()
    data = {"a": dataset("a", 50), "b": dataset("b", 60)}
    res = evaluate(m, read_metadata(m), data, {"a": original("a"), "b": original("b")},
                   progress=False, batch_size=16)
    for t in "ab":
        x, y = data[t].x, data[t].y
        got, ref = numpy_logits(x, PERTURBED[t]), numpy_logits(x, WEIGHTS[t])
        r = res[t]
        assert r["n"] == len(x) and r["source"] == data[t].source
        assert r["accuracy"] == pytest.approx(np.mean(got.argmax(1) == y))
        assert r["original_accuracy"] == pytest.approx(np.mean(ref.argmax(1) == y))
        assert r["agreement"] == pytest.approx(np.mean(got.argmax(1) == ref.argmax(1)))
        assert r["max_abs_diff"] == pytest.approx(np.abs(got - ref).max(), rel=1e-4, abs=1e-5)
    assert res["a"]["agreement"] == 1.0 and res["a"]["max_abs_diff"] < 1e-5
    assert res["b"]["agreement"] < 1.0 and res["b"]["max_abs_diff"] > 0.1


def test_evaluate_shared_input(monkeypatch):
    monkeypatch.setitem(SHAPES, "b", SHAPES["a"])
    monkeypatch.setitem(PERTURBED, "b", (RNG.standard_normal((16, 5)).astype(np.float32),
                                         np.zeros(5, np.float32)))
    m = merged(shared_input=True)
    assert [i.name for i in m.graph.input] == ["x"]
    data = {"b": dataset("b", 20)}
    res = evaluate(m, read_metadata(m), data, progress=False)
    got = numpy_logits(data["b"].x, PERTURBED["b"])
    assert set(res) == {"b"} and "agreement" not in res["b"]
    assert res["b"]["accuracy"] == pytest.approx(np.mean(got.argmax(1) == data["b"].y))


def test_unlabelled_data_has_no_accuracy(tmp_path):
    path = tmp_path / "a.onnx"
    onnx.save(original("a"), str(path))
    m = merged()
    res = evaluate(m, read_metadata(m), {"a": dataset("a", 5, labels=False)}, {"a": path},
                   progress=False)
    assert res["a"]["accuracy"] is None and res["a"]["original_accuracy"] is None
    assert res["a"]["agreement"] == 1.0


def test_shape_mismatch_is_one_line_naming_source_task_and_shapes():
    m = merged()
    bad = SimpleNamespace(x=np.zeros((5, 1, 5, 5), np.float32), y=None, source="digits.npz")
    with pytest.raises(MergeError) as e:
        evaluate(m, read_metadata(m), {"a": bad}, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("digits.npz", "'a'", "(1,5,5)", "(1,4,4)", "a/x"):
        assert part in msg


def test_bad_labels_and_unknown_task():
    m = merged()
    info = read_metadata(m)
    ds = dataset("a", 5)
    ds.y = ds.y[:3]
    with pytest.raises(MergeError, match="3 labels for 5 samples"):
        evaluate(m, info, {"a": ds}, progress=False)
    with pytest.raises(MergeError, match="no task named 'c'"):
        evaluate(m, info, {"c": dataset("a", 5)}, progress=False)
    with pytest.raises(MergeError, match="no original model"):
        evaluate(m, info, {"a": dataset("a", 5)}, {"b": original("b")}, progress=False)
